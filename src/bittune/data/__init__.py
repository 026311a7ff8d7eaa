"""Data pipeline: read rows, validate them per format, render chat templates, tokenize with completion-only
labels, truncate, pack, and batch.

Importing this package is cheap: torch, transformers, datasets and pyarrow are imported only by the functions
that need them.
"""

from bittune.data.collate import count_targets, make_collator, model_inputs
from bittune.data.formats import FORMATS
from bittune.data.prepare import PreparedData, SplitStats, prepare_data, split_eval
from bittune.data.records import Record, read_records
from bittune.data.templates import TEMPLATES, encode_prompt, render_prompt

__all__ = [
    "FORMATS",
    "TEMPLATES",
    "PreparedData",
    "Record",
    "SplitStats",
    "count_targets",
    "encode_prompt",
    "make_collator",
    "model_inputs",
    "prepare_data",
    "read_records",
    "render_prompt",
    "split_eval",
]
