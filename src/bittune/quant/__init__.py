"""Post-training quantization, fake quantization for QAT, and the quantized-model file format."""
