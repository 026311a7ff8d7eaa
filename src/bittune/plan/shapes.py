"""A model's shape from its ``config.json`` alone: its Linear layers, and how many parameters of each kind.

Llama-style decoders (Llama, Qwen2, Mistral) and BERT encoders are counted from the config numbers (hidden size,
intermediate size, heads, kv heads, vocab, layers, tied embeddings). Any other architecture is instantiated on the
``meta`` device — no memory, no weights — and its modules are walked instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from bittune.errors import BittuneError

# Model types whose modelling code is Llama's block (RMSNorm, q/k/v/o, SwiGLU MLP), counted by formula.
LLAMA_LIKE = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2"}
BERT_LIKE = {"bert"}


@dataclass(frozen=True)
class Linear:
    """One ``nn.Linear``: ``name`` is its module name without the layer index (``self_attn.q_proj``)."""

    name: str
    in_features: int
    out_features: int
    bias: bool = False

    @property
    def params(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias else 0)


@dataclass
class ModelShape:
    """Parameter layout of a model, as needed to plan memory and FLOPs.

    Attributes:
        model_type: ``config.model_type``.
        source: ``"config"`` (counted by formula) or ``"meta"`` (counted on a meta-device instance).
        layers: Number of transformer blocks.
        hidden, intermediate, heads, kv_heads, head_dim, vocab: Config numbers (0 where unknown).
        layer_linears: The Linear layers of one block (every block is the same).
        other_linears: Linear layers outside the blocks that LoRA "all-linear" may target (e.g. BERT's pooler).
        head: The output layer (lm_head, score or classifier); never quantized, never a LoRA target.
        head_tied: The head shares its weight with the input embedding.
        embedding_params: Input embeddings (tokens, positions, token types).
        other_params: Everything else: norms, biases outside Linear layers.
        decoder: A causal decoder (Llama-style) rather than an encoder.
    """

    model_type: str
    source: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    layer_linears: list[Linear]
    other_linears: list[Linear] = field(default_factory=list)
    head: Linear | None = None
    head_tied: bool = False
    embedding_params: int = 0
    other_params: int = 0
    decoder: bool = True

    @property
    def linear_params(self) -> int:
        """Parameters of all Linear layers that bitsandbytes quantizes (blocks and pooler; not the head)."""
        return self.layers * sum(lin.params for lin in self.layer_linears) + sum(
            lin.params for lin in self.other_linears
        )

    @property
    def head_params(self) -> int:
        return 0 if self.head is None or self.head_tied else self.head.params

    @property
    def total_params(self) -> int:
        """All parameters, shared (tied) tensors counted once, as ``count_parameters`` does."""
        return self.linear_params + self.head_params + self.embedding_params + self.other_params

    def all_linears(self) -> list[Linear]:
        """Every quantizable Linear, one entry per layer instance."""
        return [lin for _ in range(self.layers) for lin in self.layer_linears] + list(self.other_linears)


def load_model_config(path: str, *, trust_remote_code: bool = False, revision: str | None = None) -> Any:
    """``AutoConfig`` of a local folder or hub id, with a clear error when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as exc:
        raise BittuneError(
            f"cannot read the config of model '{path}' ({type(exc).__name__}: {str(exc).splitlines()[0]})",
            hint="point model.path at a folder with config.json (or a hub id already in the local cache)",
        ) from None


def model_shape(config: Any, *, task: str = "causal-lm", num_labels: int = 2) -> ModelShape:
    """Count a model's parameters by module type from its transformers config.

    Args:
        config: A ``PretrainedConfig`` (see :func:`load_model_config`).
        task: ``causal-lm`` (LM head) or ``classification`` (a ``num_labels`` head replaces it).
        num_labels: Classes of the classification head.

    Returns:
        The model's :class:`ModelShape`.
    """
    model_type = getattr(config, "model_type", "")
    if model_type in LLAMA_LIKE:
        return _llama_shape(config, task, num_labels)
    if model_type in BERT_LIKE and task == "classification":
        return _bert_shape(config, num_labels)
    return meta_shape(config, task=task, num_labels=num_labels)


def _llama_shape(c: Any, task: str, num_labels: int) -> ModelShape:
    h, i, n_heads = c.hidden_size, c.intermediate_size, c.num_attention_heads
    kv = getattr(c, "num_key_value_heads", None) or n_heads
    d = getattr(c, "head_dim", None) or h // n_heads
    # Qwen2 always has q/k/v biases; Llama has config flags for both; Mistral has none.
    qkv_bias = c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False))
    o_bias = bool(getattr(c, "attention_bias", False)) and c.model_type == "llama"
    mlp_bias = bool(getattr(c, "mlp_bias", False))
    linears = [
        Linear("self_attn.q_proj", h, n_heads * d, qkv_bias),
        Linear("self_attn.k_proj", h, kv * d, qkv_bias),
        Linear("self_attn.v_proj", h, kv * d, qkv_bias),
        Linear("self_attn.o_proj", n_heads * d, h, o_bias),
        Linear("mlp.gate_proj", h, i, mlp_bias),
        Linear("mlp.up_proj", h, i, mlp_bias),
        Linear("mlp.down_proj", i, h, mlp_bias),
    ]
    layers = c.num_hidden_layers
    if task == "classification":
        head, tied = Linear("score", h, num_labels), False
    else:
        head, tied = Linear("lm_head", h, c.vocab_size), bool(getattr(c, "tie_word_embeddings", False))
    return ModelShape(
        model_type=c.model_type,
        source="config",
        layers=layers,
        hidden=h,
        intermediate=i,
        heads=n_heads,
        kv_heads=kv,
        head_dim=d,
        vocab=c.vocab_size,
        layer_linears=linears,
        head=head,
        head_tied=tied,
        embedding_params=c.vocab_size * h,
        other_params=(2 * layers + 1) * h,  # two RMSNorms per block and the final one
        decoder=True,
    )


def _bert_shape(c: Any, num_labels: int) -> ModelShape:
    h, i = c.hidden_size, c.intermediate_size
    linears = [
        Linear("attention.self.query", h, h, True),
        Linear("attention.self.key", h, h, True),
        Linear("attention.self.value", h, h, True),
        Linear("attention.output.dense", h, h, True),
        Linear("intermediate.dense", h, i, True),
        Linear("output.dense", i, h, True),
    ]
    layers = c.num_hidden_layers
    embeddings = (c.vocab_size + c.max_position_embeddings + c.type_vocab_size) * h
    return ModelShape(
        model_type=c.model_type,
        source="config",
        layers=layers,
        hidden=h,
        intermediate=i,
        heads=c.num_attention_heads,
        kv_heads=c.num_attention_heads,
        head_dim=h // c.num_attention_heads,
        vocab=c.vocab_size,
        layer_linears=linears,
        other_linears=[Linear("pooler.dense", h, h, True)],
        head=Linear("classifier", h, num_labels, True),
        embedding_params=embeddings,
        other_params=2 * h + layers * 4 * h,  # embedding LayerNorm; two LayerNorms (weight, bias) per block
        decoder=False,
    )


_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def meta_shape(config: Any, *, task: str = "causal-lm", num_labels: int = 2) -> ModelShape:
    """Count parameters of any architecture by building it on the ``meta`` device (no memory is allocated).

    Linear layers under a numbered block (``model.layers.3.mlp.fc1``) are grouped per block; the output embedding
    (or the classifier, the model's last module) is the head.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    if task == "classification":
        config.num_labels = num_labels
    try:
        with torch.device("meta"):
            model = auto.from_config(config)
    except (ValueError, KeyError) as exc:
        raise BittuneError(
            f"cannot plan model type '{getattr(config, 'model_type', '?')}' for task {task}: {exc}",
            hint="bittune plan supports the models transformers can build; check model.task",
        ) from None
    head_module = model.get_output_embeddings() if task != "classification" else None
    names = [n for n, _ in model.named_modules()]
    params = dict(model.named_parameters())  # deduplicated: a tied weight appears once
    last_param = list(params)[-1].rsplit(".", 1)[0] if params else ""
    by_layer: dict[int, list[Linear]] = {}
    others: list[Linear] = []
    head: Linear | None = None
    linear_param_names: set[str] = set()
    for name in names:
        module = model.get_submodule(name) if name else model
        if isinstance(module, torch.nn.Linear):
            lin = Linear(name, module.in_features, module.out_features, module.bias is not None)
        elif type(module).__name__ == "Conv1D":  # GPT-2 style: a Linear with a transposed (in, out) weight
            lin = Linear(name, module.weight.shape[0], module.weight.shape[1], module.bias is not None)
        else:
            continue
        if module is head_module or name == last_param:
            head = lin
            continue
        linear_param_names.update(f"{name}.{p}" for p, _ in module.named_parameters(recurse=False))
        m = _LAYER_INDEX.search(f".{name}.")
        if m:
            short = name[m.end() - 1 :]
            by_layer.setdefault(int(m.group(1)), []).append(Linear(short, *_dims(lin)))
        else:
            others.append(lin)
    tied = head is not None and f"{head.name}.weight" not in params
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    head_names = {f"{head.name}.weight", f"{head.name}.bias"} if head else set()
    counted = linear_param_names | head_names
    other = sum(p.numel() for n, p in params.items() if n not in counted) - embedding
    layer_linears = by_layer[min(by_layer)] if by_layer else []
    layers = len(by_layer)
    # Blocks that differ (rare: e.g. MoE interleaving) are folded into "other" Linear layers.
    for lins in by_layer.values():
        if lins != layer_linears:
            others.extend(lins)
            layers -= 1
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_attention_heads", 0) or 0
    hidden = getattr(text, "hidden_size", 0) or 0
    return ModelShape(
        model_type=getattr(config, "model_type", "?"),
        source="meta",
        layers=layers,
        hidden=hidden,
        intermediate=getattr(text, "intermediate_size", 0) or 0,
        heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", 0) or heads,
        head_dim=getattr(text, "head_dim", 0) or (hidden // heads if heads else 0),
        vocab=getattr(text, "vocab_size", 0) or 0,
        layer_linears=layer_linears,
        other_linears=others,
        head=head,
        head_tied=tied,
        embedding_params=embedding,
        other_params=max(other, 0),
        decoder=bool(getattr(config, "is_decoder", False)) or task != "classification",
    )


def _dims(lin: Linear) -> tuple[int, int, bool]:
    return lin.in_features, lin.out_features, lin.bias
