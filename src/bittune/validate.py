"""``bittune validate``: check a config, its model and its data without training."""

from __future__ import annotations

from typing import Any

from bittune.config import RunConfig


def validate_run(cfg: RunConfig) -> dict[str, Any]:
    """Load the tokenizer and model config, read and tokenize the data, and report what training would see.

    Raises:
        BittuneError: on the first problem found in the model path or the data (config problems were
            already reported, all together, when ``cfg`` was loaded).
    """
    from transformers import AutoConfig

    from bittune.data import prepare_data
    from bittune.errors import ModelLoadError
    from bittune.model import load_tokenizer

    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    try:
        AutoConfig.from_pretrained(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {cfg.model.path}: cannot read its config ({exc})") from None
    data = prepare_data(
        train=cfg.data.train,
        eval=cfg.data.eval,
        eval_fraction=cfg.data.eval_fraction,
        fmt=cfg.data.format,
        template=cfg.data.template,
        max_length=cfg.data.max_length,
        packing=cfg.data.packing,
        train_on_prompt=cfg.data.train_on_prompt,
        system_prompt=cfg.data.system_prompt,
        columns=cfg.data.columns,
        split=cfg.data.split,
        max_rows=cfg.data.max_rows,
        tokenizer=tokenizer,
        task=cfg.model.task,
        seed=cfg.train.seed,
    )
    warnings = []
    for split, st in data.stats.items():
        if st.truncated:
            warnings.append(f"{split}: {st.truncated} rows are longer than data.max_length={cfg.data.max_length}")
        if st.dropped:
            warnings.append(f"{split}: {st.dropped} rows have nothing left to train on after truncation")
    if not data.eval:
        warnings.append("no eval data: set data.eval or data.eval_fraction to track overfitting")
    return {
        "stats": {k: vars(v) for k, v in data.stats.items()},
        "label_names": data.label_names,
        "warnings": warnings,
    }
