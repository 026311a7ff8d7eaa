"""Which speed/memory levers pay on this machine: one LoRA epoch per variant, each in its own process, alternating.

A copy of today's training step (bittune's data, model loading, LoRA, AdamW, epoch order and per-step target
normalisation) with each lever behind a flag, so that variants differ by one lever and are measured side by side:

* ``head=targets``: ``causal_lm_target_loss_sum`` (logits only at label positions, chunked cross-entropy);
* ``dtype=bf16``: bf16 autocast over fp32 weights; ``dtype=bf16-base``: frozen linears stored in bf16 + autocast
  (LoRA weights and optimizer stay fp32); ``dtype=bf16-all``: every frozen weight in bf16 (embeddings, norms:
  the residual stream is bf16, as bittune's GPU recipe does) + autocast;
* ``batching=packed``: each micro-batch's rows packed into one row (restarting position ids, no attention mask:
  rows never see each other; same rows, same loss), instead of padding to the longest;
* ``lora=fused``: ``bittune.training.fused_lora`` (one autograd node per LoRA linear, the dropout mask instead of
  a dropped copy of the input);
* ``compile``: ``torch.compile`` of each decoder layer (in place, dynamic shapes: one compiled graph serves all
  layers and lengths);
* ``trim``: glibc ``malloc_trim`` after each optimizer step; ``malloc=mmap1m``: glibc's mmap threshold fixed at
  1 MiB (epoch mode only: an environment variable of the run's process);
* ``budget=N``: each micro-batch run as forward passes of at most N padded tokens (``data.collate.split_by_tokens``:
  rows grouped by length, each pass padded to its own longest row).

    python bench/step_levers.py --dataset trec --variants base head=targets dtype=bf16 --reps 2
    python bench/step_levers.py --dataset pydoc --profile head=targets   # torch.profiler table of one variant

Results: ``bench/results/step_levers_<dataset>.md`` / ``.json``. The data sets are those of ``bench/vs_trl.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


@dataclass(frozen=True)
class Levers:
    head: str = "full"  # full | targets
    dtype: str = "fp32"  # fp32 | bf16 | bf16-base | bf16-all
    batching: str = "padded"  # padded | packed
    lora: str = "peft"  # peft | fused
    attn: str = "sdpa"  # sdpa | eager | sdpa32 (float32 attention inside bf16 autocast)
    budget: int = 0  # >0: forward passes of at most this many padded tokens (rows grouped by length)
    mask: str = "torch"  # torch | fast: how fused LoRA draws its dropout masks
    compile: bool = False
    trim: bool = False
    malloc: str = "default"  # default | mmap1m: glibc MALLOC_MMAP_THRESHOLD_=1 MiB (big blocks go back on free)
    dropout: float = 0.05

    @classmethod
    def parse(cls, spec: str) -> Levers:
        """``base`` or ``key=value,key=value`` (``compile`` / ``trim`` alone mean true)."""
        lv = cls()
        if spec == "base":
            return lv
        for part in spec.split(","):
            key, _, value = part.partition("=")
            field_type = type(getattr(lv, key))
            val: Any = {"": True, "1": True, "0": False}.get(value, value) if field_type is bool else value
            lv = replace(lv, **{key: field_type(val)})
        return lv


def best_levers(dtype: str = "auto") -> Levers:
    """The combination bittune's step is meant to use (what bench/results/step_levers_paired_*.md found to pay).

    ``auto``: bf16 where this CPU runs a bf16 matmul clearly faster than float32 (``fastest_cpu_dtype``), else
    float32. ``fp32`` / ``bf16`` force one.
    """
    import torch

    from bittune.plan.device import fastest_cpu_dtype

    if dtype == "auto":
        dtype = "bf16" if fastest_cpu_dtype() == torch.bfloat16 else "fp32"
    common = {"head": "targets", "lora": "fused", "mask": "fast", "budget": 512}
    if dtype == "bf16":
        return Levers(**common, dtype="bf16-all", attn="sdpa32")
    return Levers(**common)


# --- one epoch -------------------------------------------------------------------------------------------------


def pack_micro_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The padded micro-batch's rows, back to back in one row with restarting position ids (no padding)."""
    import torch

    mask = batch["attention_mask"].bool()
    ids = batch["input_ids"][mask][None]
    labels = batch["labels"][mask][None]
    pos = torch.cat([torch.arange(int(n)) for n in mask.sum(1)])[None]
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def load(data: dict[str, Any], lv: Levers) -> tuple[Any, Any, Any]:
    """(model with LoRA, tokenizer, prepared data) as bittune's recipe builds them."""
    import torch

    from bittune.data import prepare_data
    from bittune.demo.assets import prepare_smollm2
    from bittune.model import attach_lora, load_model, load_tokenizer

    path = str(prepare_smollm2())
    tok = load_tokenizer(path)
    prepared = prepare_data(
        train=data["chat"], eval=None, eval_fraction=0, fmt="chat", template="auto", max_length=data["max_length"],
        packing=False, train_on_prompt=False, system_prompt=None, columns={}, split="train", max_rows=None,
        tokenizer=tok, task="causal-lm", seed=0,
    )  # fmt: skip
    attn = "eager" if lv.attn == "eager" else "sdpa"
    dtype = torch.bfloat16 if lv.dtype == "bf16-all" else torch.float32  # converted while loading: no fp32 copy
    model = load_model(
        path, task="causal-lm", dtype=dtype, pad_token_id=tok.pad_token_id, device=torch.device("cpu"),
        attn_implementation=attn,
    )  # fmt: skip
    model.config.use_cache = False
    model = attach_lora(model, task="causal-lm", r=16, alpha=32, dropout=lv.dropout, target_modules="all-linear")
    apply_levers(model, lv)
    return model, tok, prepared


def apply_levers(model: Any, lv: Levers) -> None:
    """The in-place model levers: bf16 frozen linears, float32 attention, fused LoRA."""
    import torch

    from bittune.training.fused_lora import fuse_lora, unfuse_lora
    from bittune.training.precision import store_frozen_linears, store_frozen_weights, use_fp32_attention

    if lv.dtype == "bf16-base":
        store_frozen_linears(model, torch.bfloat16)
    if lv.dtype == "bf16-all":
        store_frozen_weights(model, torch.bfloat16)
    if lv.attn == "sdpa32":
        use_fp32_attention(model)
    unfuse_lora(model)
    if lv.lora == "fused":
        fuse_lora(model, fast_mask=lv.mask == "fast")
    if lv.compile:
        base = model.get_base_model()
        for layer in getattr(base, base.base_model_prefix).layers:
            if getattr(layer, "_compiled_call_impl", None) is None:
                layer.compile(dynamic=True)


def passes(batch: dict[str, Any], budget: int) -> list[dict[str, Any]]:
    """The padded micro-batch as token-budgeted passes, each cut to its own longest row."""
    from bittune.data.collate import split_by_tokens

    lengths = batch["attention_mask"].sum(1).tolist()
    out = []
    for rows in split_by_tokens(lengths, budget):
        width = max(lengths[i] for i in rows)
        out.append({k: v[rows, :width] for k, v in batch.items()})
    return out


def micro_step(model: Any, batch: dict[str, Any], lv: Levers, n_targets: int) -> float:
    """Forward and backward of one micro-batch, its loss divided by the step's target count (as bittune does)."""
    if lv.budget and "attention_mask" in batch:
        return sum(_micro_step(model, b, lv, n_targets) for b in passes(batch, lv.budget))
    return _micro_step(model, batch, lv, n_targets)


def _micro_step(model: Any, batch: dict[str, Any], lv: Levers, n_targets: int) -> float:
    import torch

    from bittune.training.evaluate import model_inputs
    from bittune.training.loss import causal_lm_loss_sum, causal_lm_target_loss_sum

    inputs, labels = model_inputs(batch, torch.device("cpu")), batch["labels"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if lv.dtype.startswith("bf16") else contextlib.nullcontext()
    with autocast:
        if lv.head == "targets":
            loss = causal_lm_target_loss_sum(model, inputs, labels) / n_targets
        else:
            loss = causal_lm_loss_sum(model(**inputs).logits, labels) / n_targets
    loss.backward()
    return loss.item()


def run_epoch(data: dict[str, Any], lv: Levers, seed: int = 42, max_steps: int | None = None) -> dict[str, Any]:
    """One epoch of LoRA training with the levers ``lv``; returns tokens, start/end times and step losses."""
    import torch

    from bittune.data import make_collator
    from bittune.recipes.finetune import epoch_batches
    from bittune.training.evaluate import count_targets
    from bittune.training.optim import build_optimizer, build_scheduler

    torch.manual_seed(seed)
    model, tok, prepared = load(data, lv)
    collate = make_collator("causal-lm", tok.pad_token_id, False)
    micro = epoch_batches(len(prepared.train), 4, seed, 0)
    groups = [micro[i : i + 2] for i in range(0, len(micro), 2)][:max_steps]
    optimizer = build_optimizer(model, lr=2e-4, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, name="adamw")
    scheduler = build_scheduler(optimizer, kind="linear", warmup_steps=0, total_steps=len(groups))
    params = [p for p in model.parameters() if p.requires_grad]
    forward = model
    tokens, losses = 0, []
    model.train()
    start = time.perf_counter()
    for group in groups:
        batches = [collate([prepared.train[i] for i in idx]) for idx in group]
        tokens += sum(int(b["attention_mask"].sum()) for b in batches)
        if lv.batching == "packed":
            batches = [pack_micro_batch(b) for b in batches]
        n_targets = sum(count_targets("causal-lm", b["labels"]) for b in batches)
        step_loss = sum(micro_step(forward, batch, lv, n_targets) for batch in batches)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss)
        if lv.trim:
            from bittune.training.memory import release_free_memory

            release_free_memory()
    return {"tokens": tokens, "start": start, "end": time.perf_counter(), "losses": losses}


# --- paired: all variants in one process, micro-batch by micro-batch ----------------------------------------------


def paired(data: dict[str, Any], variants: list[str], n_micro: int, reps: int) -> dict[str, Any]:
    """Time (and RSS-window) each variant's forward+backward on the same micro-batches, alternating variants.

    One process, one set of weights: far less noise on a shared machine than separate runs, and the losses of
    all variants are printed side by side (they must agree). The RSS peak of each micro-step is measured in its
    own ``VmHWM`` window after ``malloc_trim``, above the RSS it started from.
    """
    import copy

    import torch
    from vs_trl import vm_kb

    from bittune.data import make_collator
    from bittune.recipes.finetune import epoch_batches
    from bittune.training.evaluate import count_targets
    from bittune.training.memory import release_free_memory, reset_peak_rss

    levers = {v: Levers.parse(v) for v in variants}
    first = next(iter(levers.values()))
    model, tok, prepared = load(data, Levers(dropout=first.dropout, attn="eager" if first.attn == "eager" else "sdpa"))
    # One model per (weights dtype, attention) combination, copies of the same weights.
    models = {}
    for lv in levers.values():
        key = (lv.dtype if lv.dtype.startswith("bf16-") else "fp32", lv.attn, lv.compile)
        if key not in models:
            twin = copy.deepcopy(model)
            if lv.attn == "eager":
                twin.get_base_model().set_attn_implementation("eager")
            models[key] = twin
    del model
    collate = make_collator("causal-lm", tok.pad_token_id, False)
    micro = epoch_batches(len(prepared.train), 4, 42, 0)[:n_micro]
    batches = [collate([prepared.train[i] for i in idx]) for idx in micro]
    out: dict[str, Any] = {v: {"seconds": [], "cpu_seconds": [], "peak_mb": [], "loss": []} for v in variants}
    for rep in range(reps):
        for v in variants if rep % 2 == 0 else list(reversed(variants)):
            lv = levers[v]
            m = models[(lv.dtype if lv.dtype.startswith("bf16-") else "fp32", lv.attn, lv.compile)]
            apply_levers(m, lv)
            fwd = m
            m.train()
            for b in batches:
                bb = pack_micro_batch(b) if lv.batching == "packed" else b
                release_free_memory()
                base_kb = vm_kb("VmRSS")
                reset_peak_rss()
                torch.manual_seed(rep)
                t0, c0 = time.perf_counter(), time.process_time()
                loss = micro_step(fwd, bb, lv, count_targets("causal-lm", b["labels"]))
                out[v]["seconds"].append(time.perf_counter() - t0)
                out[v]["cpu_seconds"].append(time.process_time() - c0)
                out[v]["peak_mb"].append((vm_kb("VmHWM") - base_kb) / 1024)
                out[v]["loss"].append(round(loss, 5))
                m.zero_grad(set_to_none=True)
            print(f"rep {rep} {v}: {sum(out[v]['seconds'][-len(batches) :]):.1f} s", file=sys.stderr, flush=True)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    return {"tokens_per_rep": tokens, "micro_batches": n_micro, "variants": out}


def write_paired(args: argparse.Namespace, res: dict[str, Any], mach: dict[str, Any], wall: float) -> None:
    base = args.variants[0]
    n = res["micro_batches"]

    def best(v: str, key: str = "seconds") -> float:
        """Sum over micro-batches of the fastest repetition: the least disturbed time on a shared machine."""
        s = res["variants"][v][key]
        return sum(min(s[i::n]) for i in range(n))

    def median(v: str) -> float:
        s = res["variants"][v]["seconds"]
        return statistics.median(sum(s[i : i + n]) for i in range(0, len(s), n))

    b_t, b_med, b_m = best(base), median(base), max(res["variants"][base]["peak_mb"])
    b_cpu = best(base, "cpu_seconds")
    lines = [
        f"# Levers, paired in one process ({args.dataset})",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores; flags {', '.join(mach['flags'])}; "
        f"{args.threads} torch threads. The same {n} micro-batches ({res['tokens_per_rep']} real tokens) per "
        f"variant and repetition, forward + backward, variants alternating, {args.reps} repetitions. Speed from the "
        "fastest repetition of each micro-batch by wall time and by process CPU time (with one thread, CPU time is "
        "the compute itself, whatever else the machine runs), and the median repetition. Step peak: the highest RSS "
        "rise above the step's starting RSS (after malloc_trim), i.e. the step's own working memory.",
        "",
        f"| variant | tokens/s best | x {base} | tokens/CPU-s best | x {base} | tokens/s median | x {base} "
        f"| step peak MB | x {base} | losses |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for v in args.variants:
        t, t_med, m = best(v), median(v), max(res["variants"][v]["peak_mb"])
        cpu = best(v, "cpu_seconds")
        losses = ", ".join(f"{x:.4f}" for x in res["variants"][v]["loss"][:n])
        tok = res["tokens_per_rep"]
        lines.append(
            f"| {v} | {tok / t:.1f} | {b_t / t:.2f} | {tok / cpu:.1f} | {b_cpu / cpu:.2f} | {tok / t_med:.1f} "
            f"| {b_med / t_med:.2f} | {m:,.0f} | {m / b_m:.2f} | {losses} |"
        )
    lines += ["", f"Command: `python bench/step_levers.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min)", ""]
    stem = Path(args.out) / f"step_levers_paired_{args.dataset}{'_' + args.tag if args.tag else ''}"
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"machine": mach, "args": vars(args), **res}, indent=2))
    print("\n".join(lines))


# --- what the forward keeps for backward ---------------------------------------------------------------------------


def saved_tensors(data: dict[str, Any], variants: list[str]) -> str:
    """Bytes autograd keeps for backward after one forward of the first micro-batch, by the module that saved them.

    A ``saved_tensors_hooks`` pack hook sees every tensor an op saves; storages are counted once (a tensor saved by
    several ops, or a view of another, costs nothing more) and the weights' own storages not at all. The innermost
    module running when a tensor is saved names its row: what the activations of a step consist of, before the
    allocator adds its own overhead.
    """
    return "\n".join(line for v in variants for line in _saved_one(data, v))


def _pop(stack: list[str]) -> None:
    """A forward hook must return None, or its value replaces the module's output."""
    stack.pop()


def _saved_one(data: dict[str, Any], v: str) -> list[str]:
    import torch

    from bittune.data import make_collator
    from bittune.recipes.finetune import epoch_batches
    from bittune.training.evaluate import count_targets, model_inputs
    from bittune.training.loss import causal_lm_loss_sum, causal_lm_target_loss_sum

    lv = Levers.parse(v)
    model, tok, prepared = load(data, lv)
    model.train()
    collate = make_collator("causal-lm", tok.pad_token_id, False)
    batch = collate([prepared.train[i] for i in epoch_batches(len(prepared.train), 4, 42, 0)[0]])
    tokens = int(batch["attention_mask"].sum())
    if lv.batching == "packed":
        batch = pack_micro_batch(batch)
    stack: list[str] = ["(outside modules)"]
    hooks = []
    for name, mod in model.named_modules():
        kind = type(mod).__name__ + (" (lora_dropout)" if name.endswith("lora_dropout.default") else "")
        hooks.append(mod.register_forward_pre_hook(lambda m, a, k=kind: stack.append(k)))
        hooks.append(mod.register_forward_hook(lambda m, a, o: _pop(stack)))
    by: dict[str, int] = {}
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            by[stack[-1]] = by.get(stack[-1], 0) + st.nbytes()
        return t

    inputs, labels = model_inputs(batch, torch.device("cpu")), batch["labels"]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if lv.dtype.startswith("bf16") else None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast or contextlib.nullcontext():
        n = count_targets("causal-lm", labels)
        if lv.head == "targets":
            loss = causal_lm_target_loss_sum(model, inputs, labels) / n
        else:
            loss = causal_lm_loss_sum(model(**inputs).logits, labels) / n
    for h in hooks:
        h.remove()
    del loss
    lines = [f"### {v}: {sum(by.values()) / 2**20:,.0f} MB kept for backward ({tokens} real tokens)", ""]
    lines += ["| saved under | MB |", "|---|---:|"]
    lines += [f"| {k} | {b / 2**20:,.1f} |" for k, b in sorted(by.items(), key=lambda kv: -kv[1]) if b > 2**19]
    return [*lines, ""]


# --- parent: variants side by side --------------------------------------------------------------------------------


def child(args: argparse.Namespace) -> None:
    from vs_trl import RssSampler, vm_kb

    sampler = RssSampler()
    data = json.loads(args.data)
    lv = Levers.parse(args.child)
    if args.profile:
        profile(data, lv, args.out)
        return
    res = run_epoch(data, lv, max_steps=args.steps)
    sampler.stop()
    out = {
        "tokens": res["tokens"],
        "seconds": round(res["end"] - res["start"], 3),
        "tokens_per_s": round(res["tokens"] / (res["end"] - res["start"]), 2),
        "peak_rss_mb": round(vm_kb("VmHWM") / 1024, 1),
        "peak_rss_load_mb": sampler.peak_mb(end=res["start"]),
        "peak_rss_train_mb": sampler.peak_mb(start=res["start"]),
        "losses": [round(x, 5) for x in res["losses"]],
    }
    Path(args.result).write_text(json.dumps(out))


def profile(data: dict[str, Any], lv: Levers, out: str) -> None:
    """torch.profiler over two optimizer steps (after one warm-up step): ops by CPU time and by memory."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    run_epoch(data, lv, max_steps=1)  # warm-up in another model instance is not needed: the OS caches the files
    with torch_profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=False) as prof:
        run_epoch(data, lv, max_steps=2)
    table_t = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
    table_m = prof.key_averages().table(sort_by="self_cpu_memory_usage", row_limit=20)
    path = Path(out) / f"profile_{Path(data['chat']).name.split('.')[0]}_{lv_name(lv)}.txt"
    path.write_text(f"{lv}\n\nby self CPU time\n{table_t}\n\nby self CPU memory\n{table_m}\n")
    print(table_t)
    print(table_m)


def lv_name(lv: Levers) -> str:
    base = Levers()
    diff = [f"{k}={v}" for k, v in asdict(lv).items() if v != getattr(base, k)]
    return ",".join(diff) or "base"


def torch_threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="trec", choices=["pydoc", "trec"])
    p.add_argument("--variants", nargs="*", default=["base", "head=targets"])
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: the whole epoch)")
    p.add_argument("--scale", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="", help="suffix of the result files' names")
    p.add_argument("--saved", action="store_true", help="what one forward keeps for backward, by module")
    p.add_argument("--paired", type=int, metavar="N", help="in-process A/B on N micro-batches instead of epochs")
    p.add_argument("--profile", action="store_true", help="profile the (single) variant instead of timing it")
    p.add_argument("--work", default="/tmp/bittune-vs-trl")
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    return p.parse_args()


def run_variant(args: argparse.Namespace, variant: str, data: dict[str, Any]) -> dict[str, Any]:
    result = Path(args.work) / f"lever-{time.time_ns()}.json"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    if Levers.parse(variant).malloc == "mmap1m":
        env["MALLOC_MMAP_THRESHOLD_"] = str(2**20)
    cmd = [sys.executable, __file__, "--child", variant, "--data", json.dumps(data), "--result", str(result)]
    cmd += ["--out", args.out] + (["--steps", str(args.steps)] if args.steps else [])
    cmd += ["--profile"] if args.profile else []
    proc = subprocess.run(cmd, capture_output=not args.profile, text=True, env=env)
    if args.profile:
        return {}
    if proc.returncode != 0 or not result.exists():
        return {"error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(result.read_text())


def main() -> None:
    args = parse_args()
    if args.child:
        child(args)
        return
    from vs_trl import machine, write_data

    Path(args.work).mkdir(parents=True, exist_ok=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data = write_data(Path(args.work), args.scale)[args.dataset]
    if args.saved:
        torch_threads(args.threads)
        text = saved_tensors(data, args.variants)
        (Path(args.out) / f"saved_tensors_{args.dataset}.md").write_text(text)
        print(text)
        return
    if args.paired:
        t0 = time.time()
        torch_threads(args.threads)
        res = paired(data, args.variants, args.paired, args.reps)
        write_paired(args, res, machine(), time.time() - t0)
        return
    if args.profile:
        for v in args.variants:
            run_variant(args, v, data)
        return
    t0 = time.time()
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
    for rep in range(args.reps):
        for v in args.variants if rep % 2 == 0 else reversed(args.variants):
            r = run_variant(args, v, data)
            runs[v].append(r)
            brief = r["error"].splitlines()[-1] if "error" in r else f"{r['tokens_per_s']} tok/s, {r['peak_rss_mb']} MB"
            print(f"rep {rep} {v}: {brief} losses {r.get('losses')}", file=sys.stderr, flush=True)
    write(args, runs, machine(), time.time() - t0)


def write(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]], mach: dict[str, Any], wall: float) -> None:
    base = args.variants[0]

    def med(v: str, key: str) -> float | None:
        ok = [r[key] for r in runs[v] if "error" not in r]
        return statistics.median(ok) if ok else None

    lines = [
        f"# Levers, side by side ({args.dataset})",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores; flags {', '.join(mach['flags'])}; "
        f"OMP_NUM_THREADS={args.threads}. {args.reps} runs per variant, alternating, each its own process; "
        f"{'first ' + str(args.steps) + ' steps' if args.steps else 'one epoch'}.",
        "",
        f"| variant | tokens/s median (all) | x {base} | peak RSS MB | RSS in train | x {base} | last loss |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for v, rs in runs.items():
        ok = [r for r in rs if "error" not in r]
        if not ok:
            lines.append(f"| {v} | failed | | | | | |")
            continue
        t, m, b_t, b_m = (
            med(v, "tokens_per_s"),
            med(v, "peak_rss_mb"),
            med(base, "tokens_per_s"),
            med(base, "peak_rss_mb"),
        )
        every = ", ".join(f"{r['tokens_per_s']:.1f}" for r in ok)
        lines.append(
            f"| {v} | {t:.1f} ({every}) | "
            f"{t / b_t if b_t else float('nan'):.2f} | {m:,.0f} | {med(v, 'peak_rss_train_mb'):,.0f} | "
            f"{m / b_m if b_m else float('nan'):.2f} | {ok[0]['losses'][-1]:.4f} |"
        )
    lines += ["", f"Command: `python bench/step_levers.py {' '.join(sys.argv[1:])}` ({wall / 60:.1f} min)", ""]
    stem = Path(args.out) / f"step_levers_{args.dataset}"
    stem.with_suffix(".md").write_text("\n".join(lines))
    stem.with_suffix(".json").write_text(json.dumps({"machine": mach, "args": vars(args), "runs": runs}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
