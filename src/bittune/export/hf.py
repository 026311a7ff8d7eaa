"""A merged Hugging Face folder: safetensors weights, tokenizer with its chat template, generation config, card."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# Written into every export: marks a folder bittune may replace on a later export to the same --out.
EXPORT_MARKER = "bittune_export.json"


def check_out_dir(out: Path) -> Path:
    """Refuse an --out folder that is a file, sits in a missing folder, or holds something else already."""
    from bittune.storage import check_output_path

    # An earlier export (its marker file) is replaced; anything else in the folder is the user's.
    return check_output_path(out, ours=(EXPORT_MARKER,), may_replace=True, parent_must_exist=True)


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
