"""Importance matrix for llama.cpp's quantizer, computed in transformers from the user's own data.

llama.cpp's ``llama-imatrix`` runs a model over text and keeps, for every weight matrix, the sum of the squared
activations entering each input column and the number of rows summed (a diagonal of ``X^T X``, the statistic GPTQ
builds its full Hessian from). The quantizer then weighs each weight's rounding error by how strongly its input
column is driven. bittune gathers exactly those sums with forward pre-hooks on the model's linears while running the
run's own data (or a file) through it, names them as llama.cpp names the tensors, and hands
``sums / counts`` to ``llama_model_quantize`` (:mod:`bittune.export.kquants`).

The statistics do not depend on the rotary Q/K row reordering the export applies (it permutes output rows, not
input columns), so they transfer to the GGUF tensors as they are. They can also be saved in llama.cpp's imatrix
GGUF format (``*.in_sum2`` / ``*.counts`` tensors, ``general.type = imatrix``) for ``llama-quantize --imatrix``,
and such a file can be read back and used instead of data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bittune.errors import ConfigError, ModelLoadError

DEFAULT_TOKENS = 16384  # 32 chunks of 512 tokens: llama-imatrix's usual order of magnitude
CHUNK = 512  # tokens per sequence (llama-imatrix's default context)

Log = Callable[[str], None]


@dataclass
class Imatrix:
    """Per GGUF tensor name: the sum of squared input activations per column, and how many rows were summed."""

    sums: dict[str, Any] = field(default_factory=dict)  # name -> float64 numpy array [in_features]
    counts: dict[str, int] = field(default_factory=dict)
    dataset: str = ""
    chunks: int = 0

    def mean_squares(self) -> dict[str, Any]:
        """What ``llama_model_quantize`` takes: ``sums / count`` per tensor, as float32 (llama-quantize's load)."""
        import numpy as np

        return {n: (s / max(self.counts[n], 1)).astype(np.float32) for n, s in self.sums.items()}

    def metadata(self) -> dict[str, str | int]:
        """The ``quantize.imatrix.*`` keys llama-quantize records in the quantized file."""
        meta: dict[str, str | int] = {"entries_count": len(self.sums), "chunks_count": self.chunks}
        if self.dataset:
            meta = {"dataset": self.dataset, **meta}
        return meta


def collect_imatrix(
    model: Any, batches: Iterable[dict[str, Any]], names: dict[str, str], *, log: Log | None = None
) -> Imatrix:
    """Run ``batches`` through ``model`` and sum the squared inputs of each linear named in ``names``.

    Args:
        model: A float causal LM in eval mode.
        batches: Model inputs (``input_ids`` [, ``attention_mask``]); every position counts (pack, don't pad).
        names: transformers module name -> GGUF tensor name (e.g. ``model.layers.0.mlp.down_proj`` ->
            ``blk.0.ffn_down.weight``).
        log: Progress messages.
    """
    import numpy as np
    import torch

    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(gguf_name: str) -> Callable[..., None]:
        def pre(_module: Any, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            sq = (x * x).sum(dim=0)
            sums[gguf_name] = sums[gguf_name] + sq if gguf_name in sums else sq
            counts[gguf_name] = counts.get(gguf_name, 0) + x.shape[0]

        return pre

    hooks = [model.get_submodule(hf).register_forward_pre_hook(hook(g)) for hf, g in names.items()]
    # The blocks alone: the output head is not in the matrix, and its logits would cost a fifth of the time.
    body = model.get_decoder() if hasattr(model, "get_decoder") else model
    chunks = 0
    try:
        with torch.inference_mode():
            for batch in batches:
                body(**batch, use_cache=False)
                chunks += 1
                if log and chunks % 8 == 0:
                    log(f"imatrix: {chunks} chunks")
    finally:
        for h in hooks:
            h.remove()
    return Imatrix({n: s.cpu().numpy().astype(np.float64) for n, s in sums.items()}, counts, chunks=chunks)


def gguf_linear_names(model: Any) -> dict[str, str]:
    """transformers name -> GGUF tensor name of every linear llama.cpp's imatrix covers (the blocks' weights).

    Like ``llama-imatrix`` without ``--process-output``, the output head is left out.
    """
    import torch

    from bittune.export.gguf_writer import check_architecture, tensor_name_map

    spec = check_architecture(model.config.to_dict(), type(model).__name__)
    name_map = tensor_name_map(spec, model.config.num_hidden_layers)
    names = {}
    for hf, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            gguf_name = name_map.get_name(hf + ".weight", try_suffixes=(".weight",))
            if gguf_name and gguf_name.startswith("blk."):
                names[hf] = gguf_name
    return names


def _run_train_file(source: Any) -> str | None:
    """The train file a run directory was trained on (its validated ``run_config.yaml``), else None."""
    from bittune.artifacts import as_artifact

    cfg = as_artifact(source).run_config
    return cfg.data.train if cfg is not None else None


def data_format(data: str) -> str | None:
    """The data format of a file's first row, from its fields (None: leave it to the run's config)."""
    from bittune.data.records import read_records

    keys = set(read_records(data, "train", max_rows=1)[0].data)  # a DataError names what is wrong with the file
    if keys & {"messages", "conversations"}:
        return "chat"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    return "text" if "text" in keys else None


def imatrix_data(source: Any, imatrix: str) -> str:
    """The data ``--imatrix`` names: ``auto`` = the run's train file; else the file itself (checked, first row)."""
    if imatrix == "auto":
        train = _run_train_file(source)
        if not train:
            raise ConfigError(
                f"--imatrix auto uses a run's train file, and {getattr(source, 'path', source)} is not a run directory",
                hint="pass --imatrix FILE (text like your use, in any data format bittune reads)",
            )
        return train
    if not is_imatrix_gguf(imatrix):
        data_format(imatrix)
    return imatrix


def compute_for_export(
    source: Any, model: Any, tokenizer: Any, data: str, *, tokens: int = DEFAULT_TOKENS, log: Log | None = None
) -> Imatrix:
    """The importance matrix of ``model`` on ``data`` (first ``tokens`` tokens, packed into 512-token chunks).

    A llama.cpp imatrix GGUF file given as ``data`` is read instead (its names must be the model's tensors).
    """
    from bittune.inference import prepare_eval_rows
    from bittune.quant.api import calibration_batches

    names = gguf_linear_names(model)
    if is_imatrix_gguf(data):
        found = read_imatrix_gguf(Path(data))
        missing = sorted(set(names.values()) - set(found.sums))
        if missing:
            raise ModelLoadError(
                f"{data} has no importance data for {len(missing)} of this model's tensors (e.g. {missing[0]})",
                hint="compute it from text instead: --imatrix auto or --imatrix DATA_FILE",
            )
        return found
    # The run's own file is read as the run reads it; another file by the fields of its rows.
    fmt = None if data == _run_train_file(source) else data_format(data)
    rows = prepare_eval_rows(source, tokenizer, "causal-lm", data=data, fmt=fmt, max_rows=max(tokens // 4, 1))
    batches = calibration_batches(rows, tokens, seq_len=CHUNK)
    if not batches:
        raise ConfigError(f"--imatrix {data} gave no tokens", hint="use a file with text rows")
    if log:
        n = sum(int(b["input_ids"].numel()) for b in batches)
        log(f"computing the importance matrix on {n} tokens of {Path(data).name} ({len(batches)} chunks)")
    result = collect_imatrix(model, batches, names, log=log)
    result.dataset = Path(data).name
    return result


def is_imatrix_gguf(path: str) -> bool:
    """Whether ``path`` is a llama.cpp importance-matrix GGUF file (``general.type = imatrix``)."""
    p = Path(path)
    if p.suffix != ".gguf" or not p.is_file():
        return False
    import gguf

    try:
        field_ = gguf.GGUFReader(p).fields.get("general.type")
    except (ValueError, OSError):
        return False
    return field_ is not None and str(field_.contents()) == "imatrix"


def write_imatrix_gguf(imatrix: Imatrix, path: Path, *, chunk_size: int = CHUNK) -> None:
    """Save ``imatrix`` in llama.cpp's imatrix GGUF format (what ``llama-imatrix`` writes)."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(path, arch="")
    try:
        writer.add_type("imatrix")
        writer.add_array("imatrix.datasets", [imatrix.dataset] if imatrix.dataset else [])
        writer.add_uint32("imatrix.chunk_count", imatrix.chunks)
        writer.add_uint32("imatrix.chunk_size", chunk_size)
        for name in sorted(imatrix.sums):
            writer.add_tensor(f"{name}.in_sum2", imatrix.sums[name].astype(np.float32).reshape(1, -1))
            writer.add_tensor(f"{name}.counts", np.array([[float(imatrix.counts[name])]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def read_imatrix_gguf(path: Path) -> Imatrix:
    """Read a llama.cpp imatrix GGUF file (one matrix per tensor; no mixture-of-experts entries)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    out = Imatrix()
    ds = reader.fields.get("imatrix.datasets")
    if ds is not None and ds.contents():
        out.dataset = str(ds.contents()[0])
    chunks = reader.fields.get("imatrix.chunk_count")
    out.chunks = int(chunks.contents()) if chunks is not None else 0
    tensors = {t.name: t for t in reader.tensors}
    for name, t in tensors.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        counts = np.asarray(tensors[base + ".counts"].data, dtype=np.float64).reshape(-1)
        if counts.size != 1:
            raise ModelLoadError(
                f"{path}: {base} has {counts.size} expert matrices", hint="bittune exports dense models only"
            )
        out.sums[base] = np.asarray(t.data, dtype=np.float64).reshape(-1)
        out.counts[base] = round(float(counts[0]))
    return out
