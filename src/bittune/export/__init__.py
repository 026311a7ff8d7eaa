"""Export a model or a bittune run: GGUF for llama.cpp, a merged Hugging Face folder, a Hub upload with a card.

Modules: ``source`` (load a model folder or run dir, merging a LoRA adapter), ``gguf_writer`` (GGUF via the
``gguf`` package), ``tokenizer_meta`` (the tokenizer as llama.cpp reads it), ``hf`` (merged safetensors folder),
``card`` (model card), ``push`` (Hub upload), ``verify`` (compare a GGUF in llama.cpp with transformers).
Nothing heavy is imported here.
"""
