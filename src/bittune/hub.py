"""Fail fast when a hub id cannot be fetched: one short reachability probe instead of a minute of retries.

transformers/huggingface_hub retry a download several times with back-off before giving up (~58 s on a machine
without a network). :func:`require_reachable` asks the hub once, with a short timeout, before any loader runs, and
only when the model is not already in the local cache and offline mode is off.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from bittune.errors import ModelLoadError

PROBE_TIMEOUT_S = 4.0
DEFAULT_ENDPOINT = "https://huggingface.co"
_answered: set[str] = set()  # probe URLs the hub answered in this process (every loader asks; one probe each)


def offline() -> bool:
    """Whether HF_HUB_OFFLINE is set (the loaders then read the local cache only, without a network)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def cached(repo_id: str) -> bool:
    """Whether ``repo_id``'s config.json is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # an unusual cache layout: let the loaders decide
        return False


def require_reachable(repo_id: str, *, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Raise a clear error within ``timeout`` seconds when the hub cannot be reached for ``repo_id``.

    Skipped offline (the loaders then give their own cache error at once) and for models already cached. Any HTTP
    answer, even 401/404, means the hub is reachable: the loaders then report what is wrong with the id.
    """
    if offline() or cached(repo_id):
        return
    endpoint = os.environ.get("HF_ENDPOINT", DEFAULT_ENDPOINT).rstrip("/")
    url = f"{endpoint}/api/models/{repo_id}"
    if url in _answered:
        return
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
            _answered.add(url)
            return
    except urllib.error.HTTPError:
        _answered.add(url)
        return
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelLoadError(
            f"cannot reach the Hugging Face Hub ({endpoint}) to fetch '{repo_id}': {reason}",
            hint="check the network (or HF_ENDPOINT); without one, download the model once elsewhere and pass its "
            "folder, or set HF_HUB_OFFLINE=1 to use the local cache",
        ) from None
