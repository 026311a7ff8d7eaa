"""Several processes on one run: accelerate's Accelerator (process group, DDP, DeepSpeed) and torch's FSDP2.

Nothing here is a parallelism layer of its own; these are the few decisions the recipe needs around the
libraries:

- ``ddp``: ``accelerator.prepare`` wraps the model in DistributedDataParallel (gloo on CPU, NCCL on GPUs).
- ``fsdp``: ``torch.distributed.fsdp.fully_shard`` (FSDP2) on each transformer block, then on the root, before the
  optimizer is built. accelerate's FSDP plugin is GPU-only, while FSDP2 itself runs on CPU with gloo, so the
  same code path is tested here and used on GPUs.
- ``deepspeed``: accelerate's ``DeepSpeedPlugin`` with a ZeRO-2/3 config from :func:`deepspeed_config`; CUDA only.

Checkpoints stay in the single-process format whatever the strategy: weights and optimizer state are gathered
into full tensors (torch.distributed.checkpoint's state_dict API) and written by rank 0 alone.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bittune.errors import ConfigError


def sharded(strategy: str, accelerator: Any) -> bool:
    """FSDP2 is applied only when there is more than one process to shard over."""
    return strategy == "fsdp" and accelerator.num_processes > 1


def deepspeed_config(
    *,
    zero_stage: int,
    grad_accum: int,
    micro_batch: int,
    max_grad_norm: float | None,
    mixed_precision: str,
    offload: bool,
) -> dict[str, Any]:
    """A DeepSpeed JSON config for ZeRO stage 2 or 3 (written to ``RUN_DIR/deepspeed_config.json``).

    bittune keeps its own optimizer (AdamW built from ``train.*``) and learning-rate schedule, so the config has no
    ``optimizer``/``scheduler`` sections: DeepSpeed wraps the optimizer it is given.
    """
    zero: dict[str, Any] = {"stage": zero_stage, "overlap_comm": True, "contiguous_gradients": True}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
        if zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if zero_stage == 3:
        # Final outputs are gathered through accelerator.get_state_dict, which needs the 16-bit weights gathered.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": max_grad_norm or 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": mixed_precision == "bf16"},
        "fp16": {"enabled": mixed_precision == "fp16"},
        "steps_per_print": 10**9,  # bittune logs its own metrics
    }


def check_deepspeed(device: torch.device) -> None:
    """Refuse DeepSpeed where it cannot run: off CUDA, or without the deepspeed package."""
    if device.type != "cuda":
        raise ConfigError(
            "distributed.strategy deepspeed needs CUDA GPUs, and this run is on the CPU",
            hint="use distributed.strategy fsdp (sharded, runs on CPU with gloo) or ddp",
        )
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            "distributed.strategy deepspeed needs the deepspeed package, which is not installed",
            hint="pip install deepspeed (on the CUDA machine), or use distributed.strategy fsdp",
        )


def make_accelerator(
    *,
    strategy: str,
    device: torch.device,
    mixed_precision: str,
    ds_config: dict[str, Any] | None = None,
) -> Any:
    """The run's Accelerator; DeepSpeed is refused on CPU before anything is loaded."""
    from accelerate import Accelerator

    kwargs: dict[str, Any] = {"cpu": device.type == "cpu", "mixed_precision": mixed_precision}
    _forget_other_precision(mixed_precision)
    if strategy == "deepspeed":
        check_deepspeed(device)
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(**kwargs)


def _forget_other_precision(mixed_precision: str) -> None:
    """Let a later run in the same process use another autocast setting (one process only).

    accelerate keeps one ``AcceleratorState`` per process and refuses a second ``Accelerator`` with another
    ``mixed_precision``; a process that trains twice (tests, notebooks, the demo's LoRA then QLoRA run: bf16 on a
    CPU measured fast, then float32 for k-bit) must start the state afresh. Launched processes never get here twice.
    """
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState._shared_state
    if (
        state
        and state.get("_mixed_precision") != mixed_precision
        and state.get("distributed_type")
        in (
            DistributedType.NO,
            None,
        )
    ):
        AcceleratorState._reset_state()


def shard_model(model: torch.nn.Module, *, reshard_after_forward: bool) -> torch.nn.Module:
    """FSDP2: shard each transformer block (the model's ``_no_split_modules`` classes), then the root.

    Sharding per block lets a block's full weights exist only while it runs. Done in place, before the optimizer
    is built, so the optimizer holds the sharded parameters.
    """
    from torch.distributed.fsdp import fully_shard

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(base, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in block_names:
            fully_shard(module, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def shard_of_batch(rows: list[int], rank: int, world: int) -> list[int]:
    """Rank ``rank``'s contiguous share of one global micro-batch: no row twice, none dropped.

    A full global batch of ``b * world`` rows gives every rank exactly ``b``; a short last one is split as evenly
    as possible (a rank may get none when it has fewer rows than processes).
    """
    n = len(rows)
    return rows[n * rank // world : n * (rank + 1) // world]


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, accelerator: Any, strategy: str, sync: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter on accumulation micro-batches; sync on the last one."""
    if strategy == "deepspeed":
        # accelerate steps the DeepSpeed engine inside backward when sync_gradients is set: only on the last one.
        accelerator.sync_gradients = sync
        try:
            yield
        finally:
            accelerator.sync_gradients = True
    elif sync or accelerator.num_processes == 1:
        yield
    elif sharded(strategy, accelerator):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        with accelerator.no_sync(model):
            yield


def all_sum(accelerator: Any, value: float) -> float:
    """Sum of ``value`` over all processes (the value itself in one process)."""
    if accelerator.num_processes == 1:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=accelerator.device)
    return float(accelerator.reduce(t, reduction="sum").item())


def grad_norm(params: list[torch.Tensor], max_norm: float | None, accelerator: Any, model: Any) -> float:
    """Total gradient norm over all processes and shards, clipped to ``max_norm`` when given."""
    if accelerator.distributed_type.name == "DEEPSPEED":
        # The engine clips (gradient_clipping in its config) and keeps the norm of the last step.
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    if max_norm is not None:
        norm = accelerator.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor holding the norm over all shards
        norm = norm.full_tensor()
    return float(norm)


class Processes:
    """What one training step does differently when several processes share it; with one, nearly nothing.

    The step calls these by name, so a reader of the one-process step can skip them: targets and losses summed
    over processes (:meth:`total`), gradients synchronised only on a step's last micro-batch
    (:meth:`accumulating`), the loss scaled back up against DDP/FSDP2's gradient averaging (:meth:`backward`),
    and the gradient norm over all shards (:meth:`grad_norm`). ``accelerator`` also brings autocast and fp16 loss
    scaling, which one process on a GPU needs too.
    """

    def __init__(self, accelerator: Any, strategy: str = "ddp", grad_accum: int = 1) -> None:
        self.accelerator, self.strategy = accelerator, strategy
        world = self.world = accelerator.num_processes
        # DDP / FSDP2 average gradients over processes: multiply by N to get the sum back. DeepSpeed also divides
        # by its gradient_accumulation_steps.
        self.scale = world * (grad_accum if strategy == "deepspeed" else 1)

    def total(self, value: float) -> float:
        """``value`` summed over all processes (a collective; the value itself in one process)."""
        return all_sum(self.accelerator, value)

    def accumulating(self, model: Any, *, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch: skip the gradient all-reduce unless it is the step's ``last``."""
        return gradient_sync(model, self.accelerator, self.strategy, sync=last)

    def autocast(self) -> contextlib.AbstractContextManager:
        return self.accelerator.autocast()

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss * self.scale if self.scale != 1 else loss)

    def grad_norm(self, params: list[torch.Tensor], max_norm: float | None, model: Any) -> float:
        """The gradient norm over all processes and shards, clipped to ``max_norm`` when given."""
        return grad_norm(params, max_norm, self.accelerator, model)


class OneProcess:
    """:class:`Processes` for plain PyTorch in one process: float32, no autocast, ``loss.backward()``."""

    world, strategy = 1, "none"

    def total(self, value: float) -> float:
        return value

    def accumulating(self, model: Any, *, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def grad_norm(self, params: list[torch.Tensor], max_norm: float | None, model: Any) -> float:
        if max_norm is not None:
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        return float(torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None]))


def full_weights(model: torch.nn.Module, *, trainable_only: bool, accelerator: Any) -> dict[str, torch.Tensor]:
    """The weights as full tensors, keyed like the single-process model (a collective under FSDP2).

    Every process must call this; under FSDP2 only rank 0 receives the tensors (others get an empty dict).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    model = accelerator.unwrap_model(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    distributed = accelerator.num_processes > 1
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=distributed))
    if names is not None:
        state = {k: v for k, v in state.items() if k in names}
    return {k: v.detach() for k, v in state.items()}


def final_state_dict(model: torch.nn.Module, accelerator: Any, strategy: str) -> dict[str, torch.Tensor]:
    """Every weight as a full tensor for ``save_pretrained`` (rank 0; a collective over all processes)."""
    if strategy == "deepspeed":
        state = accelerator.get_state_dict(model)  # gathers ZeRO-3 partitions
    else:
        state = full_weights(model, trainable_only=False, accelerator=accelerator)
    # Gathered copies no longer share storage, so save_pretrained cannot see tied weights (lm_head = embeddings):
    # keep one name per parameter, as a single-process save does.
    seen: set[int] = set()
    aliases = set()
    for name, param in accelerator.unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(param) in seen:
            aliases.add(name)
        seen.add(id(param))
    return {k: v for k, v in (state or {}).items() if k not in aliases}


def full_optimizer_state(model: torch.nn.Module, optimizer: Any, accelerator: Any) -> dict[str, Any]:
    """Optimizer state keyed by parameter name with full tensors (rank 0 only under FSDP2; a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    distributed = accelerator.num_processes > 1
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one
    return get_optimizer_state_dict(
        accelerator.unwrap_model(model),
        inner,
        options=StateDictOptions(full_state_dict=True, cpu_offload=distributed),
    )


def load_full_state(
    model: torch.nn.Module,
    optimizer: Any,
    tensors: dict[str, torch.Tensor],
    opt_state: dict[str, Any],
    accelerator: Any,
) -> None:
    """Load full (single-process format) weights and optimizer state into a plain, DDP or FSDP2 model.

    Every process holds the full checkpoint; under FSDP2 each keeps only its own shard.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    model = accelerator.unwrap_model(model)
    inner = getattr(optimizer, "optimizer", optimizer)
    options = StateDictOptions(full_state_dict=True, strict=False)
    set_model_state_dict(model, tensors, options=options)
    if opt_state.get("state") and all(isinstance(k, int) for k in opt_state["state"]):
        inner.load_state_dict(opt_state)  # keyed by position: a checkpoint from before name-keyed states
    else:
        set_optimizer_state_dict(model, inner, opt_state, options=options)


def gather_rng_states(accelerator: Any, rng: dict[str, Any]) -> list[dict[str, Any]]:
    """Every process's generator states (:func:`~bittune.training.checkpoint.capture_rng`), in rank order.

    Sent as ``torch.save`` bytes: pickled tensors do not survive ``all_gather_object`` on gloo.
    """
    if accelerator.num_processes == 1:
        return [rng]
    import io

    from accelerate.utils import gather_object

    buf = io.BytesIO()
    torch.save(rng, buf)
    return [torch.load(io.BytesIO(blob), weights_only=True) for blob in gather_object([buf.getvalue()])]


def launched_world_size() -> int | None:
    """The number of processes when this one was started by a distributed launcher, else None."""
    import os

    size = os.environ.get("WORLD_SIZE")
    return int(size) if size and size.isdigit() else None


@dataclass(frozen=True)
class LaunchRequest:
    """What the launcher that started this process asked for: ``count`` processes (None: several, number unknown)."""

    launcher: str
    count: int | None

    def describe(self) -> str:
        asked = f"{self.count} processes" if self.count else "several processes"
        return f"{self.launcher} asked for {asked}"


# Process counts that launchers put in each process's environment: torchrun (and accelerate's multi-GPU launcher,
# which is torchrun) and the MPI launchers accelerate reads on CPU.
_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launch_request(
    env: Mapping[str, str] | None = None, parent_argv: Sequence[str] | None = None
) -> LaunchRequest | None:
    """How many processes the launcher that started this one asked for, or None when none did (a plain start).

    torchrun and MPI say it in every process's environment. ``accelerate launch`` does not when it starts a single
    process itself: without ``--multi_gpu`` (or several GPUs) its simple launcher runs the script once, and with
    ``--cpu`` it expects MPI to start the others. It then only sets ``ACCELERATE_USE_CPU`` and, when more than one
    process was asked for, ``MASTER_ADDR``/``MASTER_PORT``; the number itself is read from its command line (the
    parent process's, on Linux), else it is "several".

    Args:
        env: The environment to read (default ``os.environ``).
        parent_argv: The launcher's command line (default: the parent process's, from ``/proc``).
    """
    import os

    env = os.environ if env is None else env
    sizes = [int(env[k]) for k in _WORLD_SIZE_VARS if env.get(k, "").isdigit()]
    if sizes:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env else "the launcher"
        return LaunchRequest(launcher, max(sizes))
    if "ACCELERATE_USE_CPU" not in env or "MASTER_PORT" not in env:
        return None  # not accelerate's simple launcher, or it was asked for one process
    argv = _parent_argv() if parent_argv is None else list(parent_argv)
    return LaunchRequest("accelerate launch", _flag_int(argv, "--num_processes"))


def _parent_argv() -> list[str]:
    import os

    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:  # not Linux, or not allowed: the count stays unknown
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _flag_int(argv: Sequence[str], flag: str) -> int | None:
    """The value of ``flag N`` / ``flag=N`` in ``argv`` (accelerate's parser takes no abbreviations)."""
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name != flag:
            continue
        value = value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
        return int(value) if value.isdigit() else None
    return None


def relaunch(nproc: int, cli_args: list[str]) -> int:
    """Run ``python -m bittune CLI_ARGS`` in ``nproc`` processes through torch's launcher (torchrun).

    ``--standalone`` takes a free local port for the rendezvous, so concurrent jobs do not collide. Returns the
    exit code to leave with: a process's own (2 for a user error it already printed), or 0.
    """
    import sys

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(
        ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--module", "bittune", *cli_args]
    )
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [f.exitcode for f in exc.failures.values()]
        code = next((c for c in codes if c and c > 0), 1)
        if code != 2:  # 2: a BittuneError, already printed by the process that raised it
            print(f"error: a process of the {nproc}-process run failed (exit code {codes})", file=sys.stderr)
        return code
    return 0
