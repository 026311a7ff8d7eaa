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

# Largest max|Δlogit| accepted, as a fraction of the standard deviation of the transformers logits, and least
# top-1 agreement over all prompt positions. f32 and f16 bounds check the export itself (measured: ~1e-5 and ~0.01;
# a missing rotary Q/K reordering gives 4-6 and ~50% top-1). Q8_0 and Q4_0 lose precision by design, and llama.cpp
# also rounds the activations to 8 bits in their matmuls: measured ~0.3 and ~2.9 (BENCHMARKS.md), so their bounds
# only catch gross errors, and Q4_0 has no top-1 floor (tiny random models agree on as little as 30%). Their
# figures are what the quantization costs; the layout they share with f16 is what f16 checks.
TOLERANCE = {"f32": 1e-3, "f16": 0.05, "q8_0": 0.75, "q4_0": 5.0}
MIN_TOP1 = {"f32": 0.99, "f16": 0.97, "q8_0": 0.85, "q4_0": 0.0}


@dataclass
class VerifyResult:
    """What llama.cpp and transformers agreed on."""

    tokenization_equal: bool
    tokenization_mismatches: list[str] = field(default_factory=list)
    positions: int = 0
    top1_agreement: float = 0.0
    max_abs_logit_diff: float = 0.0
    logit_std: float = 0.0
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

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "relative_diff": self.relative_diff}


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


def compare_with_llamacpp(
    gguf_path: Path,
    model: Any,
    tokenizer: Any,
    *,
    qtype: str = "f16",
    texts: tuple[str, ...] = DEFAULT_TEXTS,
    prompts: tuple[str, ...] = DEFAULT_PROMPTS,
    n_greedy: int = 16,
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

        diffs, agree, total, stds = [], 0, 0, []
        for prompt in prompts:
            ids = _prompt_ids(tokenizer, prompt)
            ref = _hf_logits(model, ids)
            llm.reset()
            llm.eval(ids)
            got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
            diffs.append(float(np.abs(got - ref).max()))
            agree += int((got.argmax(-1) == ref.argmax(-1)).sum())
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
    if res.relative_diff > TOLERANCE[qtype]:
        res.problems.append(
            f"max |Δlogit| {res.max_abs_logit_diff:.4g} is {res.relative_diff:.3g} logit std (limit {TOLERANCE[qtype]})"
        )
    if res.top1_agreement < MIN_TOP1[qtype]:
        res.problems.append(f"top-1 agreement {res.top1_agreement:.1%} (limit {MIN_TOP1[qtype]:.0%})")
    if res.eos_id_gguf != res.eos_id_hf:
        res.problems.append(f"eos id {res.eos_id_gguf} in the GGUF, {res.eos_id_hf} in transformers")
    if not res.chat_template_equal:
        res.problems.append("the chat template differs")
    res.passed = not res.problems
    return res
