"""Every speed/memory lever gives the plain path's loss and gradients (within float rounding) on tiny models."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from bittune.training.loss import causal_lm_loss_sum, causal_lm_target_loss_sum, supports_target_loss  # noqa: E402

VOCAB = 97


def tiny_llama(tied: bool = True, seed: int = 0, **extra):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        initializer_range=0.25,
        pad_token_id=0,
        **extra,
    )
    return LlamaForCausalLM(config).float()


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, initializer_range=0.25,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1,
    )  # fmt: skip
    return GPT2LMHeadModel(config).float()


def lora(model, dropout: float = 0.0, targets="all-linear"):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(
        model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM")
    )
    for name, p in peft_model.named_parameters():  # B starts at zero: give it values so every gradient is nonzero
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return peft_model


def padded_batch(seed: int = 1, lengths=(9, 5, 12)):
    """Right-padded rows; labels only on each row's second half (a chat reply), -100 on prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[i, :n] = 1
        labels[i, n // 2 : n] = ids[i, n // 2 : n]
    return {"input_ids": ids, "attention_mask": mask}, labels


def loss_and_grads(model, fn):
    model.zero_grad(set_to_none=True)
    loss = fn()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.detach(), grads


def assert_grads_close(got: dict, want: dict, rel: float = 1e-5) -> None:
    """Same parameters, each gradient within ``rel`` of the reference in norm (float rounding differs by order)."""
    assert got.keys() == want.keys() and want
    for name, b in want.items():
        assert (got[name] - b).norm() <= rel * b.norm() + 1e-7, name


def assert_same(model, inputs, labels, *, chunk=4):
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    fast = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, chunk=chunk))
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(fast[1], plain[1])
    return plain


def test_target_loss_full_finetune_tied_head():
    model = tiny_llama(tied=True)
    inputs, labels = padded_batch()
    _, grads = assert_same(model, inputs, labels)
    assert "model.embed_tokens.weight" in grads  # the tied head's gradient reaches the embedding


def test_target_loss_full_finetune_untied_head():
    model = tiny_llama(tied=False)
    inputs, labels = padded_batch()
    _, grads = assert_same(model, inputs, labels)
    assert "lm_head.weight" in grads


def test_target_loss_gpt2_layout():
    model = tiny_gpt2()  # body under `transformer`, not `model`
    inputs, labels = padded_batch()
    assert_same(model, inputs, labels)


def test_target_loss_lora():
    model = lora(tiny_llama())
    assert supports_target_loss(model)
    inputs, labels = padded_batch()
    _, grads = assert_same(model, inputs, labels)
    assert grads and all("lora_" in n for n in grads)


def test_target_loss_lora_with_dropout_same_mask():
    """With dropout the two paths draw the same masks when started from the same RNG state."""
    model = lora(tiny_llama(), dropout=0.1)
    model.train()
    inputs, labels = padded_batch()
    torch.manual_seed(5)
    plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    torch.manual_seed(5)
    fast = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, chunk=4))
    torch.testing.assert_close(fast[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(fast[1], plain[1])


def test_target_loss_lora_on_the_head():
    """A LoRA-wrapped head is not a plain Linear: the chunked, recomputed path gives the same gradients."""
    model = lora(tiny_llama(tied=False), targets=["q_proj", "v_proj", "lm_head"])
    inputs, labels = padded_batch()
    _, grads = assert_same(model, inputs, labels)
    assert any("lm_head" in n for n in grads)


def test_target_loss_head_with_bias():
    from bittune.training.loss import _HeadCrossEntropy

    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB)
    h = torch.randn(11, 16, requires_grad=True)
    t = torch.randint(0, VOCAB, (11,))
    ref = torch.nn.functional.cross_entropy(head(h), t, reduction="sum")
    g_ref = torch.autograd.grad(ref * 0.5, [h, head.weight, head.bias])
    out = _HeadCrossEntropy.apply(h, head.weight, head.bias, t, 3)
    g_out = torch.autograd.grad(out * 0.5, [h, head.weight, head.bias])
    torch.testing.assert_close(out, ref)
    for a, b in zip(g_out, g_ref):
        torch.testing.assert_close(a, b)


def test_target_loss_packed_rows():
    """Packed rows (position_ids restart per example, no attention mask) agree as well."""
    model = lora(tiny_llama())
    ids = torch.randint(1, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    pos = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]])
    labels = ids.clone()
    labels[:, :3] = -100
    labels[0, 5:7] = -100
    inputs = {"input_ids": ids, "position_ids": pos, "use_cache": False}
    assert_same(model, inputs, labels)


def test_target_loss_without_targets_is_zero_and_connected():
    model = lora(tiny_llama())
    inputs, labels = padded_batch()
    labels[:] = -100
    loss = causal_lm_target_loss_sum(model, inputs, labels)
    loss.backward()
    assert float(loss) == 0.0
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters() if p.requires_grad)


def test_target_loss_no_grad_matches():
    model = lora(tiny_llama())
    inputs, labels = padded_batch()
    with torch.inference_mode():
        plain = causal_lm_loss_sum(model(**inputs).logits, labels)
        fast = causal_lm_target_loss_sum(model, inputs, labels, chunk=4)
    torch.testing.assert_close(fast, plain)


def assert_as_close_as(got, plain, exact, slack: float = 2.0) -> None:
    """``got`` (a lever under bf16) is within ``slack`` x the bf16 error of ``plain`` (the plain path under bf16)
    of the fp32 result ``exact``, for the loss and every gradient: the lever adds no error of its own beyond
    bf16's. Both errors are also small in absolute terms (bf16 keeps ~3 significant digits)."""

    def err(a, b):
        return float((a - b).norm() / b.norm().clamp(min=1e-12))

    assert err(got[0], exact[0]) <= slack * err(plain[0], exact[0]) + 1e-3
    for name, want in exact[1].items():
        e_got, e_plain = err(got[1][name], want), err(plain[1][name], want)
        assert e_got <= slack * e_plain + 1e-3 and e_got < 0.1, (name, e_got, e_plain)


def test_target_loss_bf16_autocast_within_bf16_tolerance():
    """Under CPU bf16 autocast the split head is as close to the fp32 result as the plain bf16 path is."""
    model = lora(tiny_llama())
    inputs, labels = padded_batch()
    exact = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
        fast = loss_and_grads(model, lambda: causal_lm_target_loss_sum(model, inputs, labels, chunk=4))
    assert_as_close_as(fast, plain, exact)


def test_models_the_split_does_not_cover():
    assert not supports_target_loss(tiny_llama(final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="body and head"):
        causal_lm_target_loss_sum(torch.nn.Linear(2, 2), {}, torch.zeros(1, 2, dtype=torch.long))


# --- fused LoRA linears ---------------------------------------------------------------------------------------------


def lora_on_bf16_base(base_dtype, dropout: float, targets="all-linear"):
    """LoRA as on a GPU: the frozen base holds bf16 values (stored in ``base_dtype``), the adapters are float32."""
    model = lora(tiny_llama(tied=False).to(torch.bfloat16).to(base_dtype), dropout=dropout, targets=targets)
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    return model


def fused_vs_peft(dropout: float, autocast: bool = False, targets="all-linear", base_dtype=None, float32_sum=True):
    from bittune.training.fused_lora import fuse_lora, unfuse_lora

    if base_dtype is None:
        model = lora(tiny_llama(tied=False), dropout=dropout, targets=targets)
    else:
        model = lora_on_bf16_base(base_dtype, dropout, targets)
    model.train()
    inputs, labels = padded_batch()
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)

    def run():
        torch.manual_seed(7)
        with ctx:
            return causal_lm_loss_sum(model(**inputs).logits, labels)

    plain = loss_and_grads(model, run)
    # PEFT's own dropout masks, so the two paths can be compared exactly
    n = fuse_lora(model, fast_mask=False, float32_sum=float32_sum)
    fused = loss_and_grads(model, run)
    assert unfuse_lora(model) == n
    again = loss_and_grads(model, run)
    torch.testing.assert_close(again[0], plain[0], rtol=0, atol=0)  # PEFT's own forward is back
    return n, plain, fused


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_matches_peft(dropout):
    n, plain, fused = fused_vs_peft(dropout)
    assert n == 2 * 7  # every linear of both blocks
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(fused[1], plain[1])


def test_fused_lora_under_bf16_autocast():
    """bf16 rounds differently along the two paths: each must be about as close to fp32 as PEFT's own bf16 is."""
    _, exact, _ = fused_vs_peft(0.1)
    _, plain, fused = fused_vs_peft(0.1, autocast=True)
    assert_as_close_as(fused, plain, exact)


def test_fused_lora_gpu_form_keeps_the_compute_dtype_like_peft():
    """The GPU form (``float32_sum=False``; bf16 base, float32 adapters, bf16 autocast): each adapted linear returns
    bf16 as PEFT's does; without dropout loss and gradients are PEFT's own bf16 ones, and with dropout (where the two
    round in different places) the loss is as close to the float32 result as PEFT's, over several dropout draws."""
    from bittune.training.fused_lora import fuse_lora

    _, exact, _ = fused_vs_peft(0.0, base_dtype=torch.float32)  # the same bf16 weights, computed in float32
    _, plain, fused = fused_vs_peft(0.0, autocast=True, base_dtype=torch.bfloat16, float32_sum=False)
    assert_as_close_as(fused, plain, exact, slack=1.2)

    def model(dtype, fused_form):
        m = lora_on_bf16_base(dtype, dropout=0.1)
        if fused_form:
            fuse_lora(m, fast_mask=False, float32_sum=False)
        return m.train()

    inputs, labels = padded_batch()

    def loss(m, seed, autocast):
        torch.manual_seed(seed)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            return float(causal_lm_loss_sum(m(**inputs).logits, labels))

    ref, peft_bf16, fused_bf16 = model(torch.float32, False), model(torch.bfloat16, False), model(torch.bfloat16, True)
    err_peft = sum(abs(loss(peft_bf16, s, True) - loss(ref, s, False)) for s in range(8))
    err_fused = sum(abs(loss(fused_bf16, s, True) - loss(ref, s, False)) for s in range(8))
    assert err_fused <= 2 * err_peft, (err_fused, err_peft)
    layer = fused_bf16.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(2, 3, layer.in_features, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16
    fuse_lora(fused_bf16, float32_sum=True)  # the CPU form: the sum in float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.float32


def test_fused_lora_leaves_other_layers_and_state_alone():
    from bittune.training.fused_lora import fuse_lora

    model = lora(tiny_llama(tied=False), targets=["q_proj", "v_proj"])
    keys = list(model.state_dict())
    assert fuse_lora(model) == 4
    assert fuse_lora(model) == 0  # already fused
    assert list(model.state_dict()) == keys
    model.eval()
    inputs, _ = padded_batch()
    with torch.no_grad(), model.disable_adapter():  # disabled adapters: PEFT's forward, the base model's logits
        base = model(**inputs).logits
    with torch.no_grad():
        assert not torch.equal(model(**inputs).logits, base)


def test_fast_dropout_masks_keep_the_right_share_unbiased():
    from bittune.training.fused_lora import keep_mask

    torch.manual_seed(0)
    x = torch.ones(1000, 1001)  # odd size: the last 64-bit word is only partly used
    mask, p = keep_mask(x, 0.05)
    assert mask.shape == x.shape and mask.dtype == torch.bool
    assert abs(p - 0.05) < 1 / 32768
    lanes = mask.flatten()[: 4 * (mask.numel() // 4)].view(-1, 4).float().mean(0)  # each 15-bit lane of a word
    assert torch.allclose(lanes, torch.full((4,), 1 - p), atol=3e-3)
    assert abs(float((x * mask / (1 - p)).mean()) - 1.0) < 3e-3  # the dropped layer is unbiased
    again, _ = keep_mask(x, 0.05)
    assert not torch.equal(mask, again)


def test_fused_lora_with_fast_masks_trains_every_adapter():
    from bittune.training.fused_lora import fuse_lora

    model = lora(tiny_llama(tied=False), dropout=0.1)
    assert fuse_lora(model) == 14
    model.train()
    inputs, labels = padded_batch()
    loss, grads = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    assert torch.isfinite(loss) and len(grads) == 28 and all(g.abs().sum() > 0 for g in grads.values())
    model.eval()  # no dropout in eval: the fused layers compute exactly what PEFT's do
    with torch.no_grad():
        fused_out = model(**inputs).logits
        from bittune.training.fused_lora import unfuse_lora

        unfuse_lora(model)
        torch.testing.assert_close(fused_out, model(**inputs).logits, rtol=1e-5, atol=1e-5)


# --- precision: bf16 where this CPU runs it fast ----------------------------------------------------------------------


def test_fastest_cpu_dtype_follows_the_measurement(monkeypatch):
    from bittune.plan import device

    monkeypatch.delenv(device.FORCE_CPU_DTYPE_ENV, raising=False)
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"float32": 60e9, "bfloat16": 200e9})
    assert device.fastest_cpu_dtype() == torch.bfloat16
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"float32": 60e9, "bfloat16": 1e9})  # emulated bf16
    assert device.fastest_cpu_dtype() == torch.float32
    monkeypatch.setattr(device, "cpu_matmul_rates", lambda: {"float32": 60e9, "bfloat16": 70e9})  # marginal
    assert device.fastest_cpu_dtype() == torch.float32
    monkeypatch.setenv(device.FORCE_CPU_DTYPE_ENV, "bfloat16")  # the test seam replaces the answer
    assert device.fastest_cpu_dtype() == torch.bfloat16


def test_auto_mixed_precision_on_cpu_is_bf16_only_where_measured_and_asked(monkeypatch):
    from bittune.model import resolve_mixed_precision
    from bittune.plan import device

    cpu = torch.device("cpu")
    monkeypatch.setenv(device.FORCE_CPU_DTYPE_ENV, "float32")  # e.g. AMD EPYC Zen 1: bf16 ~60x slower
    assert resolve_mixed_precision("auto", cpu, cpu_bf16_candidate=True) == "no"
    monkeypatch.setenv(device.FORCE_CPU_DTYPE_ENV, "bfloat16")  # AMX / AVX512-BF16 Xeon
    assert resolve_mixed_precision("auto", cpu, cpu_bf16_candidate=True) == "bf16"
    assert resolve_mixed_precision("auto", cpu) == "no"  # full fine-tuning, k-bit, QAT: float32
    assert resolve_mixed_precision("no", cpu, cpu_bf16_candidate=True) == "no"  # the config's override


def test_cpu_matmul_rates_are_measured():
    from bittune.plan.device import cpu_matmul_rates

    rates = cpu_matmul_rates(64, 64, 64)
    assert set(rates) == {"float32", "bfloat16"} and all(r > 0 for r in rates.values())


def test_fp32_attention_is_exact_in_fp32_and_closer_under_bf16():
    from bittune.training.precision import use_fp32_attention

    model = lora(tiny_llama())
    inputs, labels = padded_batch()
    exact = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return causal_lm_loss_sum(model(**inputs).logits, labels)

    plain = loss_and_grads(model, bf16)
    assert use_fp32_attention(model)
    assert model.get_base_model().config._attn_implementation == "bittune_sdpa_fp32"
    same = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    torch.testing.assert_close(same[0], exact[0], rtol=0, atol=0)  # float32 inputs: sdpa itself, unchanged
    assert_as_close_as(loss_and_grads(model, bf16), plain, exact)


def test_frozen_linears_in_bf16_within_bf16_tolerance():
    from bittune.training.precision import store_frozen_linears

    model = lora(tiny_llama(tied=True))
    inputs, labels = padded_batch()
    exact = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))

    def bf16():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return causal_lm_loss_sum(model(**inputs).logits, labels)

    plain = loss_and_grads(model, bf16)
    assert store_frozen_linears(model, torch.bfloat16) == 14  # the LoRA base linears; not the tied head
    base = model.get_base_model()
    assert base.model.layers[0].mlp.up_proj.base_layer.weight.dtype == torch.bfloat16
    assert base.lm_head.weight.dtype == torch.float32 and base.model.norm.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert_as_close_as(loss_and_grads(model, bf16), plain, exact)


def test_memory_helpers_run_here():
    from bittune.training.memory import current_rss_mb, release_free_memory, reset_peak_rss

    assert isinstance(release_free_memory(), bool)
    if reset_peak_rss():  # Linux: the peak window now starts near the current RSS
        from bittune.training.memory import _peak_rss_bytes

        assert _peak_rss_bytes() / 2**20 <= current_rss_mb() * 1.5 + 50


# --- token-budgeted forward passes -------------------------------------------------------------------------------


def test_split_by_tokens_covers_every_row_once_within_budget():
    from bittune.data.collate import split_by_tokens

    lengths = [60, 256, 12, 200, 90, 256, 31]
    passes = split_by_tokens(lengths, 512)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for p in passes:
        assert len(p) * max(lengths[i] for i in p) <= 512 or len(p) == 1
    assert split_by_tokens([300, 400], 100) == [[0], [1]]  # longer than the budget: alone
    assert split_by_tokens([5, 5, 5], 10**6) == [[0, 1, 2]]


def test_token_budget_passes_sum_to_the_micro_batch_gradient():
    """Rows split into passes, each padded to its own longest row, sum to the padded batch's loss and gradients."""
    from bittune.data.collate import split_by_tokens

    model = lora(tiny_llama())
    inputs, labels = padded_batch(lengths=(9, 5, 12, 3))
    whole = loss_and_grads(model, lambda: causal_lm_loss_sum(model(**inputs).logits, labels))
    lengths = inputs["attention_mask"].sum(1).tolist()

    def in_passes():
        total = 0.0
        for rows in split_by_tokens(lengths, 20):
            width = max(lengths[i] for i in rows)
            sub = {k: v[rows, :width] for k, v in inputs.items()}
            loss = causal_lm_target_loss_sum(model, sub, labels[rows, :width])
            loss.backward()
            total += float(loss)
        return torch.tensor(total, requires_grad=True)  # gradients already accumulated above

    parts = loss_and_grads(model, in_passes)
    assert len(split_by_tokens(lengths, 20)) > 1
    torch.testing.assert_close(parts[0], whole[0], rtol=1e-5, atol=1e-5)
    assert_grads_close(parts[1], whole[1])


def test_configure_omp_sets_passive_waits_without_overriding_the_user():
    from bittune.threads import configure_omp

    env: dict[str, str] = {}
    assert configure_omp(env) == {"OMP_WAIT_POLICY": "PASSIVE"} and env["OMP_WAIT_POLICY"] == "PASSIVE"
    env = {"OMP_WAIT_POLICY": "ACTIVE"}
    assert configure_omp(env) == {} and env["OMP_WAIT_POLICY"] == "ACTIVE"
    assert configure_omp() == {}  # torch is imported in this process: too late to change the runtime


def test_release_mapped_weights_unmaps_the_checkpoint(tiny_llama_dir):
    import sys

    from transformers import AutoModelForCausalLM

    from bittune.training.mapped import checkpoint_mappings, mapped_files, release_mapped_weights

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if not sys.platform.startswith("linux") or "model.safetensors" not in mapped_files():
        pytest.skip("transformers did not memory-map the checkpoint here")
    copied = release_mapped_weights(model)
    assert copied > 0
    assert "model.safetensors" not in mapped_files()  # the last view is gone, so is the mapping
    assert not any(
        lo <= p.untyped_storage().data_ptr() < hi for p in model.parameters() for lo, hi in checkpoint_mappings()
    )
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied weights stay one tensor
    assert release_mapped_weights(model) == 0


def test_fused_lora_under_bf16_keeps_a_small_adapter_update():
    """Regression: under bf16 autocast the fused layer returned ``base + adapter`` rounded to bf16, so an adapter
    share below bf16's resolution of the output (what B ~ lr after the first AdamW step gives) vanished and the
    loss curve fell far more slowly than float32's. The sum is float32 now: the adapter's share survives."""
    from bittune.training.fused_lora import fuse_lora

    model = lora(tiny_llama(tied=False), targets=["q_proj"])
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.constant_(p, 1e-4)  # an early-training adapter: output share ~1e-4 of ~1
    fuse_lora(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        exact = layer.base_layer(x) + layer.lora_B["default"](layer.lora_A["default"](x)) * layer.scaling["default"]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with model.disable_adapter():
                base = layer(x).float()
            fused = layer(x).float()
    share = exact - layer.base_layer(x)
    # The adapter's share comes through (bf16 rounds each product, not the sum): within 5% of its size.
    assert ((fused - base) - share).norm() <= 0.05 * share.norm()


def qlora_model(path, method: str, dropout: float):
    """A tiny NF4 / LLM.int8 base on CPU with LoRA, as ``bittune train`` builds a QLoRA model (B given values)."""
    from bittune.model import attach_lora, load_model, prepare_kbit_base
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec

    cpu = torch.device("cpu")
    model = load_model(str(path), task="causal-lm", dtype=torch.float32, device=cpu,
                       quantization=bnb_config(BnbSpec(method=method), cpu))  # fmt: skip
    model = prepare_kbit_base(model, gradient_checkpointing=False)
    torch.manual_seed(0)
    model = attach_lora(model, task="causal-lm", r=4, alpha=8, dropout=dropout, target_modules="all-linear")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return model.train()


@pytest.mark.parametrize("method", ["nf4", "llm-int8"])
@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_over_kbit_bases_matches_peft(tiny_llama_dir, method, dropout):
    """QLoRA on CPU: the base part by bitsandbytes' own forward/backward, the adapter as one node, PEFT's masks."""
    from bittune.training.fused_lora import fuse_lora, unfuse_lora

    model = qlora_model(tiny_llama_dir, method, dropout)
    assert fuse_lora(model, fast_mask=False) == 0  # k-bit bases only when asked
    inputs, labels = padded_batch()

    def run():
        torch.manual_seed(7)
        return causal_lm_loss_sum(model(**inputs).logits, labels)

    plain = loss_and_grads(model, run)
    n = fuse_lora(model, fast_mask=False, kbit=True)
    fused = loss_and_grads(model, run)
    assert n > 0 and unfuse_lora(model) == n
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-5, atol=1e-6)
    assert_grads_close(fused[1], plain[1])
    assert all("lora_" in name for name in fused[1])
