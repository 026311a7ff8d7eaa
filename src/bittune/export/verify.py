"""Load an exported GGUF in llama.cpp (through llama-cpp-python) and compare it with the transformers model.

Three checks: tokenization of the same texts (plain and chat-formatted, with special tokens), logits at every
position of the same token ids (max absolute difference and top-1 agreement), and greedy continuations. Logits
are compared with a tolerance, not only their argmax: an exporter that forgets the rotary Q/K reordering still
agrees on ~95% of top-1 tokens but is off by whole units in the logits.

llama.cpp runs with an f32 KV cache here, so the differences measured are those of the weights' format, not of
the cache's (the default f16 cache alone adds ~1e-3).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError

DEFAULT_TEXTS = (
    "What color is the sky? The sky is blue.",
    "Numbers 12345 and 3.14159, symbols #@!&, and  two  spaces\nnew line\tand tab.",
    "Ünïcödé: café, naïve, 東京, emoji 🙂.",
)
DEFAULT_PROMPTS = ("What is the capital of France?", "Write a haiku about the ocean.")

# Two references. Against the original float32 model, the differences are what the format costs: f32 and f16
# must agree closely (measured ~1e-5 and ~0.01 of the logit std; a missing rotary Q/K reordering gives 4-6 and ~50%
# top-1), while Q8_0 and Q4_0 lose precision by design (SmolLM2: ~0.3 and ~2.9). So quantized files are checked
# against transformers running the GGUF's own weights, dequantized: what is left is llama.cpp rounding activations
# to 8 bits in its quantized matmuls (SmolLM2 and a tuned copy: 0.19-0.43 of the logit std). That reference reads
# the file the way the writer wrote it, so it cannot see a misplaced tensor or row: the dequantized weights are
# also checked against the model's own, each within its block's rounding bound.
# Bounds are max|Δlogit| as a fraction of the std of the reference logits, and least top-1 agreement over all
# prompt positions.
TOLERANCE = {"f32": 1e-3, "f16": 0.05, "q8_0": 0.75, "q4_0": 0.75}
MIN_TOP1 = {"f32": 0.99, "f16": 0.97, "q8_0": 0.8, "q4_0": 0.7}
# Types made by llama.cpp's quantizer: held to transformers running the file's own (dequantized) weights, like
# q8_0/q4_0. What remains is llama.cpp rounding activations to 8 bits in its quantized matmuls (Q8_K blocks of 256
# for the K and IQ types); coarser weights make a model more sensitive to it. Measured on SmolLM2: q6_k 0.42,
# q5_k_m 0.54, q4_k_m 0.36, q3_k_m 0.53, q2_k 0.90 of the logit std (top-1 agreement 0.93-1.0).
LLAMACPP_TOLERANCE = {"2": 1.25, "3": 1.0}  # by the digit after q/iq; others 0.75
LLAMACPP_MIN_TOP1 = 0.7
FLOAT_TYPES = ("f32", "f16")
QUANTIZED = ("q8_0", "q4_0")  # bittune's own quantized types (the others come from llama.cpp)
# Worst error of one stored value, as a fraction of the largest |weight| in its 32-value block, for tensors made by
# llama.cpp's quantizer (whose scale search, importance weighting and quantized sub-block scales do not always round
# to the nearest level). About twice the worst case measured on random weights and on SmolLM2's real ones (e.g.
# Q4_K 0.17, IQ4_XS 0.28, Q3_K 0.39, IQ3_S 0.55), so a row written in the wrong place (errors of 1-2x) still shows.
_BLOCK_BOUND = {
    "Q8_0": 1 / 64,
    "Q6_K": 0.12,
    "Q5_0": 0.125,
    "Q5_1": 0.125,
    "Q5_K": 0.17,
    "Q4_0": 0.25,
    "Q4_1": 0.25,
    "Q4_K": 0.35,
    "IQ4_NL": 0.35,
    "IQ4_XS": 0.5,
    "Q3_K": 0.75,
    "IQ3_S": 1.0,
    "IQ3_XXS": 1.0,
    "Q2_K": 1.0,
    "IQ2_S": 1.5,
    "IQ2_XS": 1.5,
    "IQ2_XXS": 1.5,
}


@dataclass
class VerifyResult:
    """What llama.cpp and transformers agreed on."""

    tokenization_equal: bool
    tokenization_mismatches: list[str] = field(default_factory=list)
    positions: int = 0
    top1_agreement: float = 0.0
    max_abs_logit_diff: float = 0.0
    logit_std: float = 0.0
    max_abs_diff_vs_dequantized: float = 0.0
    top1_vs_dequantized: float = 0.0
    weight_error: float = 0.0  # worst stored weight error / its format's bound (quantized types)
    greedy_equal: bool = False
    greedy_common_prefix: int = 0
    greedy_tokens: int = 0
    eos_id_gguf: int | None = None
    eos_id_hf: int | None = None
    chat_template_equal: bool = True
    passed: bool = False
    problems: list[str] = field(default_factory=list)

    @property
    def relative_diff(self) -> float:
        return self.max_abs_logit_diff / self.logit_std if self.logit_std else float("inf")

    @property
    def relative_diff_vs_dequantized(self) -> float:
        return self.max_abs_diff_vs_dequantized / self.logit_std if self.logit_std else float("inf")

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "relative_diff": self.relative_diff,
            "relative_diff_vs_dequantized": self.relative_diff_vs_dequantized,
        }


def require_llama_cpp() -> Any:
    """Import ``llama_cpp`` or explain how to install it."""
    try:
        import llama_cpp
    except ImportError:
        raise BittuneError(
            "--verify needs llama-cpp-python, which is not installed",
            hint="run `make llamacpp` (installs the wheel from ../shared/wheels, else builds it, ~15 min)",
        ) from None
    return llama_cpp


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def _hf_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.inference_mode():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _hf_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch

    with torch.inference_mode():
        out = model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _lc_greedy(llm: Any, ids: list[int], n: int) -> list[int]:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    out: list[int] = []
    for _ in range(n):
        nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(nxt)
        llm.eval([nxt])
    return out


def _format_bound(original: Any, kind: str, *, exact: bool = True) -> Any:
    """Largest error each value may have in GGML type ``kind`` (blocks of 32 along the rows, fp16 scales).

    ``exact``: Q8_0/Q4_0 blocks were rounded to nearest (bittune's writer, ``gguf.quants``), so the tight bound of
    that rounding applies; otherwise (llama.cpp's quantizer) the looser per-type bound of ``_BLOCK_BOUND``.
    """
    import numpy as np

    if exact and kind in ("Q8_0", "Q4_0"):
        blocks = np.abs(original.reshape(-1, 32))
        d, rounding, qmax = (1 / 127, 0.5, 127) if kind == "Q8_0" else (1 / 8, 1.0, 8)
        bound = blocks.max(axis=1, keepdims=True) * d * (rounding + qmax * 2**-11)
        return np.broadcast_to(bound, blocks.shape).reshape(original.shape) + 1e-7
    if kind in _BLOCK_BOUND:
        blocks = np.abs(original.reshape(-1, 32))
        bound = blocks.max(axis=1, keepdims=True) * _BLOCK_BOUND[kind]
        return np.broadcast_to(bound, blocks.shape).reshape(original.shape) + 1e-7
    if kind not in ("F16", "F32", "BF16"):
        raise ValueError(f"no error bound for GGML type {kind}")
    return np.abs(original) * 2**-11 + 1e-7  # F16 (F32 is exact)


def dequantized_twin(model: Any, gguf_path: Path, *, exact: bool = True) -> tuple[Any, float]:
    """A copy of ``model`` whose weights are read back from the GGUF and dequantized (Q/K rows restored).

    ``exact``: the file's Q8_0/Q4_0 blocks are round-to-nearest (bittune's writer); False for llama.cpp's.

    Returns:
        (the copy, the worst weight error as a multiple of its format's bound: <= 1 when every weight is where
        transformers expects it; a misplaced row shows up as a large multiple)
    """
    import copy

    import gguf
    import numpy as np
    import torch

    from bittune.export.gguf_writer import ARCHITECTURES, tensor_name_map, unpermute_for_rotary

    cfg = model.config
    spec = ARCHITECTURES[type(model).__name__]
    name_map = tensor_name_map(spec, cfg.num_hidden_layers)
    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    twin = copy.deepcopy(model)
    state = {}
    worst = 0.0
    for hf_name, ref in twin.state_dict().items():
        t = stored.get(name_map.get_name(hf_name, try_suffixes=(".weight", ".bias")) or "")
        if t is None:
            continue  # a tied lm_head: it shares the embedding loaded under its own name
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(ref.shape))
        if spec.permute_qk and ".self_attn.q_proj." in hf_name:
            w = unpermute_for_rotary(w, cfg.num_attention_heads)
        elif spec.permute_qk and ".self_attn.k_proj." in hf_name:
            w = unpermute_for_rotary(w, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
        state[hf_name] = torch.from_numpy(np.array(w, dtype=np.float32))
        orig = ref.detach().float().numpy()
        worst = max(worst, float((np.abs(w - orig) / _format_bound(orig, t.tensor_type.name, exact=exact)).max()))
    twin.load_state_dict(state, strict=False)
    return twin.eval(), worst


def compare_with_llamacpp(
    gguf_path: Path,
    model: Any,
    tokenizer: Any,
    *,
    qtype: str = "f16",
    texts: tuple[str, ...] = DEFAULT_TEXTS,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    n_greedy: int = 16,
    lora_path: Path | None = None,
) -> VerifyResult:
    """Run the checks of this module on one GGUF file.

    Args:
        gguf_path: The exported file.
        model: The transformers model it was exported from (float32, eval mode).
        tokenizer: Its tokenizer.
        qtype: The export type, which selects the tolerances.
        texts: Texts whose tokenization must match exactly.
        prompts: User messages (chat-formatted when the tokenizer has a template) for logits and greedy tokens.
        n_greedy: Tokens generated greedily per prompt.
        lora_path: A GGUF LoRA adapter llama.cpp applies on top of ``gguf_path`` (``model`` is then the merged
            model); ``qtype`` is the adapter's type.
    """
    import numpy as np

    llama_cpp = require_llama_cpp()
    llm = llama_cpp.Llama(
        model_path=str(gguf_path),
        n_ctx=512,
        n_batch=512,
        logits_all=True,
        type_k=0,  # GGML_TYPE_F32
        type_v=0,
        n_threads=os.cpu_count() or 1,
        lora_path=str(lora_path) if lora_path is not None else None,
        verbose=False,
    )
    try:
        res = VerifyResult(tokenization_equal=True)
        chat_texts = [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
            for p in prompts
            if tokenizer.chat_template
        ]
        for text in (*texts, *chat_texts):
            hf = tokenizer(text, add_special_tokens=False)["input_ids"]
            lc = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
            if list(hf) != list(lc):
                res.tokenization_equal = False
                res.tokenization_mismatches.append(f"{text[:40]!r}: transformers {hf[:12]} llama.cpp {lc[:12]}")

        twin = None
        if qtype not in FLOAT_TYPES:
            twin, res.weight_error = dequantized_twin(model, gguf_path, exact=qtype in QUANTIZED)
        diffs, diffs_q, agree, agree_q, total, stds = [], [], 0, 0, 0, []
        for prompt in prompts:
            ids = _prompt_ids(tokenizer, prompt)
            ref = _hf_logits(model, ids)
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            diffs.append(float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
            ref_q = _hf_logits(twin, ids) if twin is not None else ref
            diffs_q.append(float(np.abs(got - ref_q).max()))
            agree_q += int((got.argmax(-1) == ref_q.argmax(-1)).sum())
            total += len(ids)
            stds.append(float(ref.std()))
            hf_tokens = _hf_greedy(model, ids, n_greedy)
            lc_tokens = _lc_greedy(llm, ids, n_greedy)
            prefix = next((i for i, (a, b) in enumerate(zip(hf_tokens, lc_tokens)) if a != b), n_greedy)
            res.greedy_common_prefix += prefix
            res.greedy_tokens += n_greedy
        res.positions = total
        res.top1_agreement = agree / max(total, 1)
        res.max_abs_logit_diff = max(diffs)
        res.max_abs_diff_vs_dequantized = max(diffs_q)
        res.top1_vs_dequantized = agree_q / max(total, 1)
        res.logit_std = min(stds)
        res.greedy_equal = res.greedy_common_prefix == res.greedy_tokens

        from bittune.export.tokenizer_meta import eos_ids

        eos = eos_ids(model.config, getattr(model, "generation_config", None), tokenizer)
        res.eos_id_hf = eos[0] if eos else None
        res.eos_id_gguf = int(llm.token_eos())
        template = llm.metadata.get("tokenizer.chat_template")
        res.chat_template_equal = (template or None) == (tokenizer.chat_template or None)
    finally:
        llm.close()

    if not res.tokenization_equal:
        res.problems.append("tokenization differs: " + "; ".join(res.tokenization_mismatches[:3]))
    # f32/f16: against the original model; quantized types: against the GGUF's own weights (see TOLERANCE).
    against = "transformers" if qtype in FLOAT_TYPES else "the dequantized GGUF weights in transformers"
    diff, rel = res.max_abs_diff_vs_dequantized, res.relative_diff_vs_dequantized
    top1 = res.top1_vs_dequantized
    bits = qtype.removeprefix("i").removeprefix("q")[:1]  # q4_k_m -> 4, iq2_xs -> 2
    limit = TOLERANCE.get(qtype) or LLAMACPP_TOLERANCE.get(bits, 0.75)
    min_top1 = MIN_TOP1.get(qtype, LLAMACPP_MIN_TOP1)
    if rel > limit:
        res.problems.append(f"max |Δlogit| vs {against} {diff:.4g} is {rel:.3g} logit std (limit {limit})")
    if res.weight_error > 1.0:
        res.problems.append(
            f"stored weights differ from the model's by {res.weight_error:.3g}x the {qtype} rounding bound"
        )
    if top1 < min_top1:
        res.problems.append(f"top-1 agreement with {against} {top1:.1%} (limit {min_top1:.0%})")
    if res.eos_id_gguf != res.eos_id_hf:
        res.problems.append(f"eos id {res.eos_id_gguf} in the GGUF, {res.eos_id_hf} in transformers")
    if not res.chat_template_equal:
        res.problems.append("the chat template differs")
    res.passed = not res.problems
    return res
