"""``train_step`` on its own: one optimizer step of a tiny LoRA model against a step written out by hand."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bittune.recipes.finetune import StepStats, train_step
from bittune.training.loss import TaskLoss
from tiny import color_chat_rows, write_jsonl


def micro_batches(tokenizer, path, *, rows: int, seed: int, split: int, max_length: int, packing: bool):
    """``rows`` chat rows written to ``path``, tokenized and collated as two micro-batches (the first ``split``
    rows, then the rest; 0: half of the tokenized rows each)."""
    from bittune.data import make_collator, prepare_data

    write_jsonl(path, color_chat_rows(rows, seed=seed))
    data = prepare_data(
        train=str(path), eval=None, eval_fraction=0.0, fmt="chat", template="auto", max_length=max_length,
        packing=packing, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tokenizer, task="causal-lm", seed=0,
    )  # fmt: skip
    split = split or len(data.train) // 2
    collate = make_collator("causal-lm", tokenizer.pad_token_id, packing)
    return [collate(data.train[:split]), collate(data.train[split:])]


@pytest.fixture(scope="module")
def batches(tokenizer, tmp_path_factory):
    """Two collated micro-batches of different lengths and target counts (gradient accumulation 2)."""
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    return micro_batches(tokenizer, path, rows=5, seed=3, split=3, max_length=64, packing=False)


def lora_model(path, seed: int = 0):
    from bittune.model import attach_lora, load_model

    torch.manual_seed(seed)
    model = load_model(str(path), task="causal-lm", dtype=torch.float32)
    model = attach_lora(model, task="causal-lm", r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():  # B starts at zero; give it values so that A gets a gradient too
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def optimizer_and_schedule(model):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** (step + 1))


def hand_written_step(model, batches, max_grad_norm: float) -> tuple[float, float]:
    """The reference: token-summed cross-entropy of both micro-batches over their total targets, one backward."""
    total, targets = 0.0, 0
    for b in batches:
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        labels = b["labels"][:, 1:]
        total = total + F.cross_entropy(
            logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        targets += int((labels != -100).sum())
    loss = total / targets
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    return loss.item(), norm.item()


def test_one_step_equals_the_hand_written_step(tiny_llama_dir, batches):
    model = lora_model(tiny_llama_dir)
    reference = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, sched = optimizer_and_schedule(model)
    ref_opt, _ = optimizer_and_schedule(reference)

    stats = train_step(
        model, opt, sched, batches, loss_fn=TaskLoss("causal-lm"), device=torch.device("cpu"), max_grad_norm=0.5
    )
    ref_loss, ref_norm = hand_written_step(reference, batches, max_grad_norm=0.5)
    ref_opt.param_groups[0]["lr"] = 0.5 * 1e-2  # the schedule's first multiplier
    ref_opt.step()

    assert isinstance(stats, StepStats) and stats.nonfinite is None and stats.task_loss is None
    assert stats.loss == pytest.approx(ref_loss, rel=1e-6)
    assert stats.grad_norm == pytest.approx(ref_norm, rel=1e-5)
    assert stats.grad_norm > 0.5  # the clip really clipped
    assert stats.lr == pytest.approx(0.5e-2) and sched.get_last_lr()[0] == pytest.approx(0.25e-2)
    assert stats.tokens == sum(int(b["attention_mask"].sum()) for b in batches)
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(p, before[name]) != p.requires_grad, name  # exactly the trainable weights moved
    assert all(p.grad is None for p in model.parameters())  # gradients cleared for the next step


def test_the_accelerator_path_of_one_process_is_the_plain_step(tiny_llama_dir, batches):
    """The recipe always steps through ``Processes`` (autocast, fp16 scaling): in one CPU process it changes nothing."""
    from accelerate import Accelerator

    from bittune.training.distributed import Processes

    plain, accelerated = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    a = train_step(plain, *optimizer_and_schedule(plain), batches, loss_fn=TaskLoss("causal-lm"),
                   device=torch.device("cpu"), max_grad_norm=1.0)  # fmt: skip
    procs = Processes(Accelerator(cpu=True, mixed_precision="no"), "ddp", grad_accum=2)
    b = train_step(accelerated, *optimizer_and_schedule(accelerated), batches, loss_fn=TaskLoss("causal-lm"),
                   device=torch.device("cpu"), max_grad_norm=1.0, procs=procs)  # fmt: skip
    assert (a.loss, a.grad_norm, a.lr, a.tokens) == (b.loss, b.grad_norm, b.lr, b.tokens)
    for p, q in zip(plain.parameters(), accelerated.parameters(), strict=True):
        assert torch.equal(p, q)


def test_a_placeholder_micro_batch_adds_nothing(tiny_llama_dir, batches):
    """Weight 0 (several processes, none of this one's rows): it runs, but changes neither loss nor gradient."""
    one, two = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    a = train_step(one, *optimizer_and_schedule(one), batches[:1], loss_fn=TaskLoss("causal-lm"),
                   device=torch.device("cpu"), max_grad_norm=None)  # fmt: skip
    b = train_step(two, *optimizer_and_schedule(two), [batches[0], batches[1]], loss_fn=TaskLoss("causal-lm"),
                   device=torch.device("cpu"), max_grad_norm=None, weights=[1.0, 0.0])  # fmt: skip
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert b.tokens == a.tokens
    for p, q in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_a_non_finite_loss_skips_the_update_and_says_so(tiny_llama_dir, batches):
    # TaskLoss's default is the full-logits path, where __call__ computes the loss (the recipe's runs poison the
    # other path too: tests/test_reliability.py).
    class Poisoned(TaskLoss):
        def __call__(self, logits, labels, inputs):
            total, part = super().__call__(logits, labels, inputs)
            return total * float("nan"), part

    model = lora_model(tiny_llama_dir)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt, sched = optimizer_and_schedule(model)
    stats = train_step(model, opt, sched, batches, loss_fn=Poisoned("causal-lm"), device=torch.device("cpu"),
                       max_grad_norm=1.0)  # fmt: skip
    assert stats.nonfinite == "loss"
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert not opt.state  # AdamW never stepped: no moments were created
    assert sched.last_epoch == 1  # the schedule still moves on, as the loop counts the step


# --- the speed levers the recipe turns on (issue 14): same loss and gradients as the plain step ------------------


def _step_and_grads(model, batches, loss_fn, **kwargs):
    """One step with a zero learning rate (weights stay put) and the gradients it computed, clipped to nothing.

    A parameter's hook sees each backward's gradient, before accumulation: summed here over the step's passes."""
    grads = {}

    def add(name, g):
        grads[name] = grads[name] + g.detach().float() if name in grads else g.detach().float().clone()

    hooks = [p.register_hook(lambda g, n=n: add(n, g)) for n, p in model.named_parameters() if p.requires_grad]
    opt, sched = optimizer_and_schedule(model)
    stats = train_step(model, opt, sched, batches, loss_fn=loss_fn, device=torch.device("cpu"), max_grad_norm=None,
                       **kwargs)  # fmt: skip
    for h in hooks:
        h.remove()
    return stats, grads


def test_head_only_at_targets_is_the_plain_step(tiny_llama_dir, batches):
    from bittune.training.loss import targets_only

    plain, fast = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    assert targets_only(TaskLoss("causal-lm", head_at_targets=True), fast)
    assert not targets_only(TaskLoss("causal-lm"), plain)
    a, grads_a = _step_and_grads(plain, batches, TaskLoss("causal-lm"))
    b, grads_b = _step_and_grads(fast, batches, TaskLoss("causal-lm", head_at_targets=True))
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert b.tokens == a.tokens and set(grads_a) == set(grads_b)
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)


def test_shared_prompt_prefix_is_the_plain_step(tiny_llama_dir, batches, monkeypatch):
    """Chat rows share their template's opening and the question's first words: run once, same step."""
    import bittune.training.shared_prefix as sp

    prefixes: list[int] = []
    real = sp.shared_prefix_hidden
    monkeypatch.setattr(sp, "shared_prefix_hidden", lambda *a: prefixes.append(a[3]) or real(*a))
    plain, shared = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    a, grads_a = _step_and_grads(plain, batches, TaskLoss("causal-lm"))
    b, grads_b = _step_and_grads(shared, batches, TaskLoss("causal-lm", head_at_targets=True, share_prefix=True))
    assert len(prefixes) == len(batches) and min(prefixes) > 3  # both micro-batches took the shared path
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert b.tokens == a.tokens and set(grads_a) == set(grads_b)
    for name, g in grads_a.items():  # in norm: the prefix's gradient is summed over the rows in another order
        assert (grads_b[name] - g).norm() <= 1e-5 * g.norm() + 1e-7, name


def test_shared_prefix_setting_resolves_by_device_and_checkpointing():
    from bittune.config import TrainConfig
    from bittune.recipes.finetune import share_prefix

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert share_prefix(TrainConfig(), cpu) and not share_prefix(TrainConfig(), cuda)
    assert share_prefix(TrainConfig(shared_prefix=True), cuda)
    assert not share_prefix(TrainConfig(shared_prefix=False), cpu)
    assert share_prefix(TrainConfig(gradient_checkpointing=True), cpu)  # the checkpointed layers read its cache
    assert TaskLoss("classification", head_at_targets=True, share_prefix=True).share_prefix is False


def test_pass_budget_resolves_by_device_and_processes():
    """``train.max_tokens_per_pass: auto`` pools a step's rows on CPU only, and never across several processes
    (their collectives count micro-batches); a number or None is taken as given in one process."""
    from types import SimpleNamespace

    from bittune.config import TrainConfig
    from bittune.data.collate import CPU_TOKENS_PER_PASS
    from bittune.recipes.finetune import tokens_per_pass

    def rt(device, world=1, strategy="ddp"):
        return SimpleNamespace(device=torch.device(device), world=world, strategy=strategy)

    assert tokens_per_pass(TrainConfig(), rt("cpu")) == CPU_TOKENS_PER_PASS
    assert tokens_per_pass(TrainConfig(), rt("cuda")) is None
    assert tokens_per_pass(TrainConfig(max_tokens_per_pass=256), rt("cuda")) == 256
    assert tokens_per_pass(TrainConfig(max_tokens_per_pass=None), rt("cpu")) is None
    assert tokens_per_pass(TrainConfig(max_tokens_per_pass=256), rt("cpu", world=2)) is None
    assert tokens_per_pass(TrainConfig(), rt("cpu", strategy="deepspeed")) is None


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_the_cpu_speedups_keep_the_step(tiny_llama_dir, batches, mixed_precision):
    """float32: fused LoRA computes the plain step (float rounding); bf16 (frozen base in bf16, fp32 attention,
    autocast): within bf16's tolerance (8-bit mantissa, 2^-8 = 0.4% per rounding, accumulated through the layers):
    loss within 0.5%, gradient norm within 3%, all gradients together within 5% of their norm, and each gradient
    tensor pointing the same way (cosine >= 0.99)."""
    from bittune.training.distributed import Processes, make_accelerator
    from bittune.training.speedups import apply_speedups

    plain, fast = lora_model(tiny_llama_dir), lora_model(tiny_llama_dir)
    done = apply_speedups(fast, device=torch.device("cpu"), mixed_precision=mixed_precision, lora=True)
    assert done["fused_lora"] > 0 and (done.get("frozen_bf16", 0) > 0) == (mixed_precision == "bf16")
    frozen = {p.dtype for p in fast.parameters() if not p.requires_grad}
    assert frozen == {torch.bfloat16 if mixed_precision == "bf16" else torch.float32}
    assert {p.dtype for p in fast.parameters() if p.requires_grad} == {torch.float32}  # adapters, AdamW: fp32
    accelerator = make_accelerator(strategy="ddp", device=torch.device("cpu"), mixed_precision=mixed_precision)
    procs = Processes(accelerator, "ddp", grad_accum=2)
    a, grads_a = _step_and_grads(plain, batches, TaskLoss("causal-lm"))
    b, grads_b = _step_and_grads(fast, batches, TaskLoss("causal-lm", head_at_targets=True), procs=procs)
    if mixed_precision == "no":
        assert b.loss == pytest.approx(a.loss, rel=1e-6)
        for name, g in grads_a.items():
            torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)
    else:
        assert b.loss == pytest.approx(a.loss, rel=5e-3)
        assert b.grad_norm == pytest.approx(a.grad_norm, rel=3e-2)
        flat_a = torch.cat([grads_a[n].flatten() for n in sorted(grads_a)])
        flat_b = torch.cat([grads_b[n].flatten() for n in sorted(grads_a)])
        assert (flat_b - flat_a).norm() <= 0.05 * flat_a.norm()
        for name, g in grads_a.items():
            assert F.cosine_similarity(grads_b[name].flatten(), g.flatten(), dim=0) >= 0.99, name


def test_the_cpu_speedups_train_a_bert_classifier(tiny_bert_dir, tokenizer, tmp_path):
    """A BERT classifier (nn.LayerNorm after a fused LoRA linear's float32 output) under the bf16 levers: its norms
    stay float32 (CPU layer_norm refuses a float32 input with bf16 weights), and the step is the plain one within
    bf16's tolerance."""
    from bittune.data import make_collator, prepare_data
    from bittune.model import attach_lora, load_model
    from bittune.training.distributed import Processes, make_accelerator
    from bittune.training.speedups import apply_speedups
    from tiny import sentiment_rows

    path = write_jsonl(tmp_path / "cls.jsonl", sentiment_rows(8, seed=1))
    data = prepare_data(
        train=str(path), eval=None, eval_fraction=0.0, fmt="classification", template="auto", max_length=32,
        packing=False, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tokenizer, task="classification", seed=0,
    )  # fmt: skip
    batches = [make_collator("classification", tokenizer.pad_token_id, False)(data.train)]

    def model():
        torch.manual_seed(0)
        m = load_model(str(tiny_bert_dir), task="classification", dtype=torch.float32, label_names=data.label_names)
        m = attach_lora(m, task="classification", r=4, alpha=8, dropout=0.0, target_modules="all-linear")
        return m.eval()  # BERT's own dropout off: both steps see the same network

    plain, fast = model(), model()
    done = apply_speedups(fast, device=torch.device("cpu"), mixed_precision="bf16", lora=True)
    assert done["frozen_bf16"] > 0 and done["fused_lora"] > 0
    norms = [p for m in fast.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
    assert norms and {p.dtype for p in norms} == {torch.float32}
    assert torch.bfloat16 in {p.dtype for p in fast.parameters() if not p.requires_grad}  # the linears, embeddings
    procs = Processes(make_accelerator(strategy="ddp", device=torch.device("cpu"), mixed_precision="bf16"), "ddp", 1)
    a, _ = _step_and_grads(plain, batches, TaskLoss("classification"))
    b, _ = _step_and_grads(fast, batches, TaskLoss("classification"), procs=procs)
    assert b.loss == pytest.approx(a.loss, rel=2e-2) and b.grad_norm == pytest.approx(a.grad_norm, rel=5e-2)


def _assert_passes_are_the_plain_step(model_dir, batches, budget):
    """A step under ``max_tokens_per_pass=budget`` has the plain step's loss, tokens and gradients."""
    plain, split = lora_model(model_dir), lora_model(model_dir)
    a, grads_a = _step_and_grads(plain, batches, TaskLoss("causal-lm"))
    b, grads_b = _step_and_grads(split, batches, TaskLoss("causal-lm"), max_tokens_per_pass=budget)
    assert b.loss == pytest.approx(a.loss, rel=1e-6) and b.grad_norm == pytest.approx(a.grad_norm, rel=1e-5)
    assert b.tokens == a.tokens
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("pooled", [False, True], ids=["split", "pooled"])
def test_token_budgeted_passes_are_the_plain_step(tiny_llama_dir, batches, pooled):
    """``max_tokens_per_pass``: the step's rows pooled and regrouped by length into passes, whether that splits the
    micro-batches (long rows) or joins them into one wider pass (short rows, narrower rows padded); same loss,
    tokens and gradients."""
    from bittune.data.collate import step_passes

    widths = [b["input_ids"].shape[1] for b in batches]
    rows = sum(len(b["input_ids"]) for b in batches)
    budget = rows * max(widths) if pooled else min(widths) * 2
    passes = step_passes(batches, budget)
    if pooled:  # one pass of every row, as wide as the widest micro-batch
        assert len(passes) == 1 and passes[0]["input_ids"].shape == (rows, max(widths))
    else:
        assert len(passes) > len(batches)
    assert all(p["input_ids"].numel() <= budget or len(p["input_ids"]) == 1 for p in passes)
    for key in ("attention_mask", "labels"):
        kept = sum(int((p[key] != (-100 if key == "labels" else 0)).sum()) for p in passes)
        assert kept == sum(int((b[key] != (-100 if key == "labels" else 0)).sum()) for b in batches), key
    _assert_passes_are_the_plain_step(tiny_llama_dir, batches, budget)


def test_packed_rows_split_into_passes_are_the_plain_step(tiny_llama_dir, tokenizer, tmp_path):
    """Packed micro-batches (no attention mask; position ids restart per sequence) under a pass budget: whole rows,
    as many as the budget holds, within their micro-batch; same loss, tokens and gradients."""
    from bittune.data.collate import step_passes

    packed = micro_batches(tokenizer, tmp_path / "chat.jsonl", rows=12, seed=5, split=0, max_length=32, packing=True)
    assert len(packed[0]["input_ids"]) >= 2 and "attention_mask" not in packed[0]
    width = packed[0]["input_ids"].shape[1]
    passes = step_passes(packed, width)  # one row per pass
    assert len(passes) == sum(len(b["input_ids"]) for b in packed) and all(len(p["input_ids"]) == 1 for p in passes)
    assert all(set(p) == {"input_ids", "labels", "position_ids"} for p in passes)
    _assert_passes_are_the_plain_step(tiny_llama_dir, packed, width)


def test_evaluation_takes_the_head_at_targets_with_the_full_logits_loss(tiny_llama_dir, batches, monkeypatch):
    """``evaluate`` (the recipe's evals, ``bittune eval``) computes a LoRA model's loss with the head at label
    positions only, and it is the full-logits loss up to float rounding."""
    import bittune.training.loss as loss_module
    from bittune.data.collate import count_targets
    from bittune.training.evaluate import evaluate, model_inputs

    model = lora_model(tiny_llama_dir).eval()
    cpu = torch.device("cpu")
    with torch.inference_mode():
        total = sum(
            float(loss_module.causal_lm_loss_sum(model(**model_inputs(b, cpu)).logits, b["labels"])) for b in batches
        )
    targets = sum(count_targets("causal-lm", b["labels"]) for b in batches)
    real, calls = loss_module.causal_lm_target_loss_sum, []
    monkeypatch.setattr(loss_module, "causal_lm_target_loss_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert evaluate(model, batches, task="causal-lm", device=cpu)["eval_loss"] == pytest.approx(
        total / targets, rel=1e-6
    )
    assert len(calls) == len(batches)
