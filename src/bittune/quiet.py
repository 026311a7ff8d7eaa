"""Keep third-party chatter (progress bars, warnings from inside libraries) off a person's terminal.

bittune prints its own progress and results; transformers' "Loading weights" / "Writing model shards" bars,
FutureWarnings raised inside transformers/peft, bitsandbytes' import notice, lm-eval's and datasets' INFO logs
say nothing a user can act on. :func:`quiet_by_default` is called by the CLI unless ``--debug`` is given;
:func:`quiet_third_party` scopes the same to one block for library callers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator

NOISY_LOGGERS = ("transformers", "peft", "bitsandbytes", "lm-eval", "lm_eval", "datasets", "accelerate", "urllib3")
_FROM = r"(transformers|peft|accelerate|bitsandbytes|lm_eval|datasets|torch)(\..*)?"
QUIET_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    # tqdm reads TQDM_* defaults when it is imported: lm-eval's request bars and datasets' split bars go too.
    "TQDM_DISABLE": "1",
}
_state: dict = {"quiet": False, "set_env": []}


def _silence_warnings() -> None:
    for category in (FutureWarning, UserWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=_FROM)


def quiet_by_default() -> None:
    """Process-wide: third-party loggers to ERROR, their progress bars off, their warnings ignored."""
    _state["quiet"] = True
    for key, value in QUIET_ENV.items():  # in the environment, so child processes (ladder rungs, --nproc) agree
        if key not in os.environ:
            os.environ[key] = value
            _state["set_env"].append(key)
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    _silence_warnings()


def show_third_party() -> None:
    """Undo :func:`quiet_by_default` (``--debug``): its environment variables, logger levels and warning filters."""
    _state["quiet"] = False
    for key in _state["set_env"]:
        os.environ.pop(key, None)
    _state["set_env"] = []
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    warnings.filters[:] = [
        f for f in warnings.filters if not (f[0] == "ignore" and f[3] is not None and f[3].pattern == _FROM)
    ]


def is_quiet() -> bool:
    """Whether :func:`quiet_by_default` was called in this process (the CLI without ``--debug``)."""
    return _state["quiet"]


@contextlib.contextmanager
def quiet_third_party() -> Iterator[None]:
    """Within the block: transformers' progress bars off and its logging at ERROR, third-party warnings ignored.

    Used around model loads and saves. With ``--debug`` (the CLI did not call :func:`quiet_by_default`) nothing
    is hidden.
    """
    if not _state["quiet"]:
        yield
        return
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            _silence_warnings()
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
