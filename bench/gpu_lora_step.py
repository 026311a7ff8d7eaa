"""Why LoRA trained slower than full fine-tuning on a GPU, and what the fused LoRA linears change: one training
step of a random-initialised ~1.1B Llama, variant by variant, in one process.

Variants (all bf16 autocast, AdamW, HF's own causal-LM loss, the same token batch):

* ``full``: float32 weights, every parameter trained (what ``bittune train`` does for ``method: full``);
* ``frozen_floor``: the bf16 base with nothing trained but the input embedding, so backward still runs through
  every layer: the least any adapter method can cost;
* ``lora_peft``: LoRA r=16 on all linear layers with PEFT's own forward (float32 adapters on a bf16 base);
* ``lora_peft_nocast``: the same without PEFT's cast of each adapted linear's input to the adapter's float32;
* ``lora_fused``: bittune's fused LoRA linears (:mod:`bittune.training.fused_lora`), sum in the compute dtype (the
  GPU form ``bittune train`` uses);
* ``lora_fused_f32sum``: the fused linears with the CPU form's float32 sum.

For each: median step time over ``--steps`` timed steps (after 3 warm-up steps, synchronised), tokens/s, peak CUDA
memory, and from a 2-step torch profile the GPU's busy time per step (sum of kernel times), the kernel launches per
step and the slowest kernels: busy time well below the step time means the step waits on the CPU (Python and
launches), not on the GPU.

    python bench/gpu_lora_step.py [--batch 8] [--seq 512] [--steps 10] [--dropout 0.0] [--out bench/results]

Writes ``gpu_lora_step.json`` and ``gpu_lora_step.md`` (after each variant, so a cut-short run keeps what it had).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling gpu_qlora.py: the same 1.1B model

VARIANTS = ("full", "frozen_floor", "lora_peft", "lora_peft_nocast", "lora_fused", "lora_fused_f32sum")


def llama_config(tiny: bool = False) -> Any:
    """TinyLlama's shape (1.1B) with SmolLM2's vocabulary; ``tiny``: a 2-layer one, to try the script on a CPU."""
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=False, use_cache=False,
        )  # fmt: skip
    from gpu_qlora import llama_1b_config

    config = llama_1b_config()
    config.use_cache = False
    return config


def build(variant: str, dropout: float, device: str, tiny: bool) -> tuple[Any, Any]:
    """The model and optimizer of one variant, on the GPU."""
    import torch
    from transformers import LlamaForCausalLM

    from bittune.model import attach_lora
    from bittune.training.fused_lora import fuse_lora

    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(tiny)).to(torch.float32 if variant == "full" else torch.bfloat16)
    if variant == "frozen_floor":
        model.requires_grad_(False)
        model.get_input_embeddings().weight.requires_grad_(True)
    elif variant.startswith("lora"):
        model = attach_lora(
            model, task="causal_lm", r=16, alpha=32, dropout=dropout, target_modules="all-linear", bias="none"
        )
        if variant == "lora_peft_nocast":
            for module in model.modules():
                if hasattr(module, "lora_A"):
                    module.cast_input_dtype_enabled = False
        elif variant.startswith("lora_fused"):
            fuse_lora(model, fast_mask=True, float32_sum=variant.endswith("f32sum"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.AdamW(params, lr=1e-5)


def measure(variant: str, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch.profiler import ProfilerActivity, profile

    dev = args.device
    cuda = dev == "cuda"
    if cuda:
        import gc

        gc.collect()  # the previous variant's model and optimizer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model, opt = build(variant, args.dropout, dev, args.tiny)
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=dev, generator=gen)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step() -> float:
        with torch.autocast(dev, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    for _ in range(3):
        step()
    sync()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()  # float(loss) synchronises
        sync()
        times.append(time.perf_counter() - t0)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            step()
        sync()
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA" and e.self_device_time_total > 0]
    busy_us = sum(e.self_device_time_total for e in kernels) / 2
    launches = sum(e.count for e in kernels) / 2
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:8]
    step_s = statistics.median(times)
    out = {
        "variant": variant,
        "step_ms": round(step_s * 1e3, 1),
        "tokens_per_s": round(args.batch * args.seq / step_s),
        "gpu_busy_ms": round(busy_us / 1e3, 1),
        "gpu_busy_share": round(busy_us / 1e6 / step_s, 2),
        "kernels_per_step": int(launches),
        "peak_cuda_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else 0.0,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "top_kernels_ms": [[e.key[:90], round(e.self_device_time_total / 2e3, 2)] for e in top],
    }
    return out


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, device: str, torch_version: str) -> str:
    lines = [
        f"Random-initialised Llama, 1.17B parameters (hidden 2048, 22 layers, vocab 49152), {device}, torch "
        f"{torch_version}; batch {args.batch} x {args.seq} tokens, bf16 autocast, AdamW; LoRA r=16 / alpha 32 / "
        f"dropout {args.dropout} on all linear layers; median of {args.steps} steps after 3 warm-up steps.",
        "",
        "| variant | step ms | tokens/s | GPU busy ms/step (share) | kernels/step | peak CUDA GB | trainable |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error'][:80]} | | | | | |")
            continue
        lines.append(
            f"| {r['variant']} | {r['step_ms']} | {r['tokens_per_s']:,} | {r['gpu_busy_ms']} ({r['gpu_busy_share']}) "
            f"| {r['kernels_per_step']:,} | {r['peak_cuda_gb']} | {r['trainable']:,} |"
        )
    lines.append("")
    for r in results:
        if "top_kernels_ms" in r:
            top = "; ".join(f"{k} {t}" for k, t in r["top_kernels_ms"][:5])
            lines.append(f"Slowest kernels, {r['variant']} (ms/step): {top}")
            lines.append("")
    lines.append(f"Command: `python bench/gpu_lora_step.py {' '.join(sys.argv[1:])}`")
    return "\n".join(lines) + "\n"


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (to try the script on a CPU)")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for variant in args.variants:
        try:
            results.append(measure(variant, args))
        except Exception as exc:  # one failing variant must not lose the others' numbers
            results.append({"variant": variant, "error": f"{type(exc).__name__}: {exc}"})
        print(json.dumps(results[-1]), flush=True)
        device = torch.cuda.get_device_name(0) if args.device == "cuda" else args.device
        text = markdown(results, args, device, torch.__version__)
        suffix = "" if args.dropout == 0 else "_dropout"
        (out / f"gpu_lora_step{suffix}.md").write_text(text)
        (out / f"gpu_lora_step{suffix}.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print(text)


if __name__ == "__main__":
    main()
