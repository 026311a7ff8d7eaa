"""Peak RSS by phase, fp32 LoRA vs QLoRA NF4 on SmolLM2-135M: where a k-bit run's memory goes, and what helps.

Each configuration runs in its own process: import, load (VmHWM of the load alone), after ``malloc_trim``,
after ``release_mapped_weights`` (k-bit: drop the checkpoint file pages the quantizer read), with LoRA attached,
and the peak of two optimizer steps on 4 x 256 random tokens (the window reset before training, so it is the
training peak alone). RssAnon / RssFile split anonymous memory from mapped checkpoint pages.

    python bench/kbit_phases.py                 # ~5 min on 2 quiet cores
    python bench/kbit_phases.py --only "QLoRA NF4" "QLoRA NF4, released"

Writes ``bench/results/kbit_phases.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent

CONFIGS: dict[str, dict[str, Any]] = {
    "LoRA fp32": {},
    "LoRA fp32, levers": {"levers": True},
    "QLoRA NF4": {"nf4": True},
    "QLoRA NF4, released": {"nf4": True, "release": True},
    "QLoRA NF4, released, levers": {"nf4": True, "release": True, "levers": True},
    "QLoRA NF4, released, levers, grad ckpt": {"nf4": True, "release": True, "levers": True, "ckpt": True},
}


def status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) // 1024
    return out


def child(cfg: dict[str, Any]) -> dict[str, Any]:
    """One configuration's phases (MB)."""
    import torch

    from bittune.training.memory import release_free_memory, reset_peak_rss

    phases = {"imports": status()}
    from bittune.demo.assets import prepare_smollm2
    from bittune.model import attach_lora, load_model, load_tokenizer, prepare_kbit_base
    from bittune.quant.api import bnb_config
    from bittune.quant.spec import BnbSpec
    from bittune.training.loss import causal_lm_loss_sum, causal_lm_target_loss_sum
    from bittune.training.mapped import release_mapped_weights

    path = str(prepare_smollm2())
    tok = load_tokenizer(path)
    reset_peak_rss()
    quant = None
    if cfg.get("nf4"):
        quant = bnb_config(BnbSpec(method="nf4", double_quant=True, compute_dtype="float32"))
    model = load_model(
        path, task="causal-lm", dtype=torch.float32, pad_token_id=tok.pad_token_id, quantization=quant,
        device=torch.device("cpu"),
    )  # fmt: skip
    phases["load"] = status()
    release_free_memory()
    phases["load, trimmed"] = status()
    if cfg.get("release"):
        copied = release_mapped_weights(model)
        release_free_memory()
        phases["released"] = {**status(), "copied_mb": copied >> 20}
    if quant is not None:
        model = prepare_kbit_base(model, gradient_checkpointing=bool(cfg.get("ckpt")))
    model.config.use_cache = False
    model = attach_lora(model, task="causal-lm", r=16, alpha=32, dropout=0.05, target_modules="all-linear")
    if cfg.get("levers"):
        from bittune.training.fused_lora import fuse_lora

        fuse_lora(model)
    phases["lora"] = status()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (4, 256), generator=gen)
    labels = ids.clone()
    labels[:, :64] = -100  # a prompt without targets, as chat rows have
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    model.train()
    release_free_memory()
    reset_peak_rss()
    t0 = time.perf_counter()
    for _ in range(2):
        n = int((labels[:, 1:] != -100).sum())
        if cfg.get("levers"):
            loss = causal_lm_target_loss_sum(model, inputs, labels) / n
        else:
            loss = causal_lm_loss_sum(model(**inputs).logits, labels) / n
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    phases["train"] = {**status(), "s_per_step": round((time.perf_counter() - t0) / 2, 1)}
    return phases


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "results"))
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(CONFIGS[args.child])))
        return
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    results = {}
    for name in args.only or CONFIGS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", name], capture_output=True, text=True, env=env, check=False
        )
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        results[name] = json.loads(line[7:]) if line else {"error": proc.stderr[-1500:]}
        print(name, json.dumps(results[name]), file=sys.stderr, flush=True)
    write(args, results)


def write(args: argparse.Namespace, results: dict[str, Any]) -> None:
    sys.path.insert(0, str(HERE))
    from vs_trl import machine

    mach = machine()
    lines = [
        "# Peak RSS by phase: LoRA fp32 vs QLoRA NF4 (SmolLM2-135M, 4 x 256 tokens, 2 steps)",
        "",
        f"Machine: {mach['cpu']}, {mach['cores']} cores, OMP_NUM_THREADS={args.threads}. MB; each configuration "
        "its own process. load = VmHWM of loading; trained = VmHWM of the two steps alone (window reset before).",
        "",
        "| configuration | RSS after load (anon + file) | load peak | after release | training peak | s/step | "
        "process peak |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, ph in results.items():
        if "error" in ph:
            lines.append(f"| {name} | failed | | | | | |")
            continue
        trimmed, rel, tr = ph["load, trimmed"], ph.get("released"), ph["train"]
        after = f"{rel['VmRSS']:,} ({rel['RssAnon']:,} + {rel['RssFile']:,})" if rel else ""
        peak = max(ph["load"]["VmHWM"], tr["VmHWM"])
        lines.append(
            f"| {name} | {trimmed['VmRSS']:,} ({trimmed['RssAnon']:,} + {trimmed['RssFile']:,}) "
            f"| {ph['load']['VmHWM']:,} | {after} | {tr['VmHWM']:,} | {tr['s_per_step']} | {peak:,} |"
        )
    lines += ["", f"Command: `python bench/kbit_phases.py {' '.join(sys.argv[1:])}`", ""]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "kbit_phases.md").write_text("\n".join(lines))
    (out / "kbit_phases.json").write_text(json.dumps({"machine": mach, "results": results}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
