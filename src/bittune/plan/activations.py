"""Bytes that a training step keeps alive between forward and backward: saved activations and the loss's logits.

The per-layer formulas follow what autograd saves in transformers' Llama block with sdpa attention; they were
checked tensor by tensor with ``torch.autograd.graph.saved_tensors_hooks`` on SmolLM2-shaped models (float32,
CPU), where the formula matches the hooked total to within 1% (``bench/plan_vs_measured.py`` repeats the check
end to end). BERT follows the same accounting with its own block.
"""

from __future__ import annotations

from dataclasses import dataclass

from bittune.plan.shapes import ModelShape

FP32 = 4


@dataclass(frozen=True)
class ActivationSpec:
    """How a step runs, as far as saved activations care.

    Attributes:
        act_bytes: Bytes per element of activations (4 float32 on CPU, 2 under bf16/fp16 autocast).
        resid_bytes: Bytes per element of the residual stream: the weights' dtype (float32 for full fine-tuning
            even under autocast; bf16 for a bf16 LoRA base).
        full: The base weights are trained (their norms then also keep the normalized input).
        lora_rank_per_layer: Sum of LoRA ranks over the wrapped Linear layers of one block.
        mask: An attention mask is materialized (packed rows, or padded batches).
        seq: Tokens per row.
        checkpointing: Gradient checkpointing of every block.
    """

    act_bytes: int
    resid_bytes: int
    full: bool
    lora_rank_per_layer: int
    mask: bool
    seq: int
    checkpointing: bool


def layer_bytes_per_token(shape: ModelShape, spec: ActivationSpec) -> float:
    """Bytes one block saves for backward, per token (without checkpointing)."""
    if not shape.decoder:
        return _encoder_layer_bytes(shape, spec)
    if not shape.hidden or not shape.heads:
        return _generic_layer_bytes(shape, spec)
    h, i, a = shape.hidden, shape.intermediate, spec.act_bytes
    q = shape.heads * shape.head_dim
    # With a mask, transformers repeats k/v to all heads before sdpa (GQA inside sdpa needs mask-free calls).
    kv = q if spec.mask else shape.kv_heads * shape.head_dim
    b = 2 * h * FP32  # RMSNorm inputs: the norm upcasts to float32 and keeps that copy for x.pow(2)'s backward
    b += 2 * h * a  # the inputs of q/k/v and of gate/up (one tensor each, shared by the projections)
    b += (2 * q + 2 * kv) * a  # sdpa keeps q, k, v and its output, which is also o_proj's input
    b += 4 * i * a  # gate, silu(gate), up, and silu(gate) * up (down_proj's input)
    b += (shape.heads + 2) * FP32  # sdpa's logsumexp per head; one rsqrt per norm
    if spec.full:
        b += 2 * h * FP32  # the normalized input, kept for the (trainable) norm weight's gradient
    b += spec.lora_rank_per_layer * a  # each LoRA A output, lora_B's input
    if spec.mask:
        b += spec.seq * a  # sdpa materializes the (batch, 1, seq, seq) mask in the compute dtype, every layer
    return b


def _encoder_layer_bytes(shape: ModelShape, spec: ActivationSpec) -> float:
    """BERT block (post-LayerNorm, GELU, dropout in training).

    Hooked on a 64-wide BERT in training mode (transformers 5.23, CPU): 10 hidden-sized tensors (attention input,
    q, k, v, attention output, two dropout masks, two LayerNorm inputs, one LayerNorm output), 2 intermediate-
    sized (GELU input and output), and 3 (heads x seq) attention maps (softmax, dropout mask, dropped
    probabilities: attention dropout keeps sdpa off its fused kernels); the formula matched to the byte.
    """
    h, i, a = shape.hidden, shape.intermediate, spec.act_bytes
    b = (10 * h + 2 * i + 3 * shape.heads * spec.seq) * a
    b += 4 * FP32  # LayerNorm mean and rstd, twice
    b += spec.lora_rank_per_layer * a
    return b


def _generic_layer_bytes(shape: ModelShape, spec: ActivationSpec) -> float:
    """Unknown block: every Linear's input and output kept once (a rough stand-in, flagged in the report)."""
    elems = sum(lin.in_features + lin.out_features for lin in shape.layer_linears)
    return elems * spec.act_bytes + spec.lora_rank_per_layer * spec.act_bytes


def activation_bytes(shape: ModelShape, spec: ActivationSpec, tokens: int) -> dict[str, float]:
    """Saved activations of one micro-batch of ``tokens`` tokens, by part.

    Returns:
        ``layers`` (all blocks, or with checkpointing their saved inputs), ``recompute`` (with checkpointing: one
        block's activations, rebuilt during backward) and ``other`` (final norm, head input).
    """
    per_layer = layer_bytes_per_token(shape, spec)
    h = shape.hidden
    other = (h * FP32 + FP32) * tokens  # final norm input and rsqrt
    if spec.full:
        other += (h * FP32 + h * spec.act_bytes) * tokens  # its normalized input; the head's input
    if spec.checkpointing:
        # Each block keeps only its input hidden states; backward reruns one block at a time.
        return {
            "layers": shape.layers * h * spec.resid_bytes * tokens,
            "recompute": per_layer * tokens,
            "other": other,
        }
    return {"layers": shape.layers * per_layer * tokens, "recompute": 0.0, "other": other}


def logits_bytes(
    shape: ModelShape, *, tokens: int, act_bytes: int, classification: bool, head_at_targets: bool = False
) -> float:
    """Peak bytes of the logits and the float32 cross-entropy, at the start of backward (or the end of forward).

    Full logits (distillation, several processes): the recipe's loss takes ``logits[:, :-1].float()``, reshapes it
    (a copy, in float32), and cross-entropy keeps its log-softmax (float32). At the start of backward, the loss
    gradient and the log-softmax gradient exist too. Measured with a fixed malloc threshold: 4 float32 copies of
    (tokens x vocab) at the peak on CPU, and 3.5 under bf16 autocast (bf16 logits + 3 float32 copies).

    ``head_at_targets`` (the default causal-LM training loss, :data:`bittune.training.loss.HEAD_CHUNK`): the head
    runs over at most one chunk of label positions at a time, whose logits (in the compute dtype) and their float32
    softmax-gradient are the only vocabulary-wide tensors; counted as if every position were a label (an upper bound).
    """
    if classification or shape.head is None:
        return 0.0
    vocab = shape.head.out_features
    if head_at_targets:
        from bittune.training.loss import HEAD_CHUNK

        return min(tokens, HEAD_CHUNK) * vocab * (act_bytes + FP32)
    return tokens * vocab * (act_bytes + 3 * FP32)
