"""A micro-batch's common prompt prefix computed once gives the plain path's loss and gradients."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bittune.training.loss import causal_lm_loss_sum, causal_lm_target_loss_sum  # noqa: E402
from bittune.training.shared_prefix import shared_prefix_length  # noqa: E402
from test_perf_equivalence import VOCAB, assert_grads_close, lora, loss_and_grads, tiny_llama  # noqa: E402


def prefixed_batch(prefix: int = 7, replies=((4, 3), (6, 2), (2, 5)), seed: int = 3):
    """Rows = the same ``prefix`` tokens, then (prompt, reply) lengths of their own; right-padded; labels on the
    replies only (as chat data: the system prompt and instruction are shared, the question and answer are not)."""
    g = torch.Generator().manual_seed(seed)
    head = torch.randint(1, VOCAB, (prefix,), generator=g)
    lengths = [prefix + p + r for p, r in replies]
    width = max(lengths)
    ids = torch.zeros(len(replies), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, ((p, r), n) in enumerate(zip(replies, lengths)):
        ids[i, :prefix] = head
        ids[i, prefix:n] = torch.randint(1, VOCAB, (p + r,), generator=g)
        ids[i, prefix] = 1 + (i % (VOCAB - 1))  # the rows part right after the prefix
        mask[i, :n] = 1
        labels[i, n - r : n] = ids[i, n - r : n]
    return {"input_ids": ids, "attention_mask": mask}, labels


def test_prefix_length_stops_where_rows_part_or_targets_begin():
    inputs, labels = prefixed_batch(prefix=7)
    assert shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], labels, min_saved=0) == 7
    labels[1, 6] = inputs["input_ids"][1, 6]  # a target inside the prefix: its logits at 5 must see the suffix
    assert shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], labels, min_saved=0) == 5
    one = {k: v[:1] for k, v in inputs.items()}
    assert shared_prefix_length(one["input_ids"], one["attention_mask"], labels[:1], min_saved=0) == 0
    # Too little saved to pay for a second forward: 2 x 7 of 3 x 15 padded tokens is 31%, under the 50% asked.
    assert shared_prefix_length(inputs["input_ids"], inputs["attention_mask"], labels, min_saved=0.5) == 0


@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("tied", [True, False])
def test_shared_prefix_matches_the_plain_path_lora(tied: bool, dropout: float):
    model = lora(tiny_llama(tied=tied), dropout=dropout)
    model.train()
    if dropout:
        model.eval()  # dropout draws differ by design (one mask for the shared prefix); compare without drawing
    inputs, labels = prefixed_batch()
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    shared = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, chunk=4, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])


def test_shared_prefix_matches_the_plain_path_full_finetune():
    model = tiny_llama(tied=True)
    inputs, labels = prefixed_batch()
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    shared = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])
    assert "model.embed_tokens.weight" in shared[1]  # the prefix's embeddings get the rows' summed gradient


def _embedded_shapes(model, inputs, labels) -> list[tuple[int, ...]]:
    seen: list[tuple[int, ...]] = []
    embed = model.get_base_model().model.embed_tokens
    hook = embed.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape)))
    try:
        causal_lm_target_loss_sum(model, inputs, labels, share_prefix=True)
    finally:
        hook.remove()
    return seen


def test_shared_prefix_really_runs_the_prefix_once():
    """The body sees 1 x prefix tokens, then the rows' own tokens packed into one row without their padding."""
    model = lora(tiny_llama())
    inputs, labels = prefixed_batch(prefix=7, replies=((4, 3), (6, 2), (2, 5)))
    assert _embedded_shapes(model, inputs, labels) == [(1, 7), (1, 7 + 8 + 7)]


def test_rows_stay_padded_where_packing_would_cost_more():
    """Packed, attention spans every row's tokens: with little padding to save that costs more than it saves, and
    the rows run padded (batch x rest); an attention without boolean 4-D masks (eager) is never packed."""
    model = lora(tiny_llama())
    inputs, labels = prefixed_batch(prefix=7, replies=((4, 3), (5, 3), (4, 4)))  # no padding at all
    width = inputs["input_ids"].shape[1]
    assert _embedded_shapes(model, inputs, labels) == [(1, 7), (3, width - 7)]
    eager = lora(tiny_llama(attn_implementation="eager"))
    inputs, labels = prefixed_batch(prefix=7)
    width = inputs["input_ids"].shape[1]
    assert _embedded_shapes(eager, inputs, labels) == [(1, 7), (3, width - 7)]
    plain = loss_and_grads(eager, lambda: causal_lm_loss_sum(eager(**inputs).logits, labels))
    shared = loss_and_grads(eager, lambda: causal_lm_target_loss_sum(eager, inputs, labels, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])


def test_packed_rows_match_the_plain_path_with_targets_at_row_ends():
    """A target on every row's last token, rows of very different lengths: packing must never let a row's last
    hidden state predict the next row's first token."""
    model = lora(tiny_llama())
    inputs, labels = prefixed_batch(prefix=6, replies=((1, 9), (7, 1), (2, 2), (3, 6)))
    assert _embedded_shapes(model, inputs, labels)[1][0] == 1  # packed
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    shared = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])


def test_shared_prefix_under_bf16_autocast_with_fp32_attention():
    """The demo's CPU setting: bf16 autocast with bittune's float32 attention; same result as the plain bf16 path
    within bf16 rounding."""
    from bittune.training.precision import use_fp32_attention

    model = lora(tiny_llama())
    assert use_fp32_attention(model)
    inputs, labels = prefixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
        shared = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=2e-2, atol=1e-2)
    assert_grads_close(shared[1], plain[1], rel=5e-2)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_shared_prefix_other_model_families(family: str):
    """GPT-2 (learned positions, body under ``transformer``) and Qwen2 (biased q/k/v) share the prefix exactly too."""
    from test_perf_equivalence import tiny_gpt2

    if family == "gpt2":
        model = tiny_gpt2()
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        ))  # fmt: skip
    inputs, labels = prefixed_batch()
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    shared = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, share_prefix=True))
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])


def _checkpointed(model):
    """``model`` with every decoder layer checkpointed, as ``train.gradient_checkpointing`` sets it."""
    from bittune.model import enable_checkpointing

    enable_checkpointing(model)
    model.train()
    return model


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_shared_prefix_under_gradient_checkpointing_matches_the_plain_path(family: str):
    """Checkpointed layers keep reading the prefix's keys and values (their recompute in backward reads the same),
    so loss and gradients are the plain checkpointed path's; the prefix runs once and whole, the rows' layers are
    recomputed in backward. GPT-2's own forward drops the cache when checkpointing: covered too."""
    from test_perf_equivalence import tiny_gpt2

    if family == "llama":
        model = _checkpointed(lora(tiny_llama()))
        first_attention = model.get_base_model().model.layers[0].self_attn
    else:
        model = _checkpointed(tiny_gpt2())
        first_attention = model.transformer.h[0].attn
    inputs, labels = prefixed_batch(prefix=7)
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    seen: list[tuple[int, ...]] = []
    hook = first_attention.register_forward_hook(lambda mod, args, out: seen.append(tuple(out[0].shape[:2])))
    try:
        shared = loss_and_grads(
            model, lambda: causal_lm_target_loss_sum(model, inputs, labels, chunk=4, share_prefix=True)
        )
    finally:
        hook.remove()
    torch.testing.assert_close(shared[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(shared[1], plain[1])
    # the prefix once (not recomputed: it is one row), the rows' pass (packed), then the rows' recompute in backward
    assert seen == [(1, 7), (1, 22), (1, 22)]


def test_shared_prefix_under_gradient_checkpointing_keeps_the_dropout_draws():
    """With LoRA dropout, checkpointing changes nothing: the recompute replays the forward's draws."""
    inputs, labels = prefixed_batch()
    results = []
    for checkpointing in (False, True):
        model = lora(tiny_llama(), dropout=0.1)
        model = _checkpointed(model) if checkpointing else model.train()
        torch.manual_seed(5)
        results.append(
            loss_and_grads(model, lambda m=model: causal_lm_target_loss_sum(m, inputs, labels, share_prefix=True))
        )
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-6, atol=1e-7)
    assert_grads_close(results[1][1], results[0][1])
