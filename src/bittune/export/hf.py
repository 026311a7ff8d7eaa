"""A merged Hugging Face folder: safetensors weights, tokenizer with its chat template, generation config, card."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from bittune.errors import StorageError

# Written into every export: marks a folder bittune may replace on a later export to the same --out.
EXPORT_MARKER = "bittune_export.json"


def check_out_dir(out: Path) -> Path:
    """Refuse an --out folder that is a file, sits in a missing folder, or holds something else already."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise StorageError(f"--out {out} is a file", hint="give a folder path for --format hf")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_MARKER).is_file():
        raise StorageError(
            f"--out {out} is a folder that already holds other files",
            hint="choose a new folder (an earlier bittune export there would be replaced)",
        )
    if not out.parent.is_dir():
        raise StorageError(
            f"--out {out}: the folder {out.parent} does not exist", hint=f"create it first (mkdir -p {out.parent})"
        )
    if not os.access(out.parent, os.W_OK):
        raise StorageError(f"--out {out}: {out.parent} is not writable", hint="choose a writable location")
    return out


def save_hf_folder(model: Any, tokenizer: Any, folder: Path, *, card: str | None, info: dict[str, Any]) -> None:
    """Write a merged model into an existing (empty) ``folder``.

    The generation config gets the eos the model stops at (also the pad id when missing), so
    ``model.generate`` stops at the end of a chat turn just as it did after tuning.
    """
    from bittune.export.tokenizer_meta import eos_ids

    gen = getattr(model, "generation_config", None)
    if gen is not None:
        eos = eos_ids(model.config, gen, tokenizer)
        if eos:
            gen.eos_token_id = eos[0] if len(eos) == 1 else eos
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    if card is not None:
        (folder / "README.md").write_text(card, encoding="utf-8")
    (folder / EXPORT_MARKER).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
