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

    from bittune.errors import ModelLoadError
    from bittune.model import check_lora_targets, load_tokenizer, model_source, refuse_quantized_folder
    from bittune.recipes.finetune import prepare_run_data

    refuse_quantized_folder(model_source(cfg.model.path))
    tokenizer = load_tokenizer(cfg.model.path, trust_remote_code=cfg.model.trust_remote_code)
    try:
        AutoConfig.from_pretrained(model_source(cfg.model.path), trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"model.path {cfg.model.path}: cannot read its config ({exc})") from None
    data = prepare_run_data(cfg, tokenizer)
    if cfg.method != "full":
        check_lora_targets(
            cfg.model.path,
            task=cfg.model.task,
            target_modules=cfg.lora.target_modules,
            num_labels=len(data.label_names or []) or 2,
            trust_remote_code=cfg.model.trust_remote_code,
            revision=cfg.model.revision,
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
