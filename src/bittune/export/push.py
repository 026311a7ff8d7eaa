"""``bittune push``: export a run as a merged Hugging Face folder with its model card and upload it to the Hub.

The token is whatever ``huggingface_hub`` finds itself (``HF_TOKEN`` or a ``hf auth login``); bittune never
reads it into a file, a message or the card. ``--dry-run DIR`` stages the exact folder that would be uploaded
and stops before the network.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError
from bittune.tracking import redact

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


def check_repo_id(repo: str) -> str:
    if not _REPO_ID.match(repo) or ".." in repo or repo.endswith((".git", ".")) or len(repo) > 96:
        raise BittuneError(
            f"--repo '{repo}' is not a Hub repository id", hint="use owner/name, e.g. --repo alice/smollm2-trec"
        )
    return repo


def push_to_hub(
    path: str,
    repo: str,
    *,
    private: bool = False,
    dry_run: Path | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Export ``path`` (run dir or model folder) and upload it to ``repo``, or only stage it with ``dry_run``.

    Returns:
        ``repo``, ``files`` uploaded (or staged), ``url`` (uploads) or ``staged`` folder (dry run).
    """
    from bittune.export.commands import export_hf

    check_repo_id(repo)
    if dry_run is not None:
        staged = export_hf(path, Path(dry_run), name=repo, log=log)
        return {"repo": repo, "dry_run": True, "staged": staged["path"], "files": staged["files"]}

    from huggingface_hub import HfApi, get_token

    token = get_token()
    if token is None:  # checked before the export, which takes a while
        raise BittuneError(
            f"no Hugging Face token to push to {repo}",
            hint="run `hf auth login` or set HF_TOKEN (or stage the folder with --dry-run DIR)",
        )
    with tempfile.TemporaryDirectory(prefix="bittune-push-") as tmp:
        staged = export_hf(path, Path(tmp) / repo.split("/")[1], name=repo, log=log)
        api = HfApi()
        log(f"uploading {len(staged['files'])} files to {repo} ...")
        try:
            url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
            api.upload_folder(
                repo_id=repo,
                folder_path=staged["path"],
                repo_type="model",
                commit_message="Upload model exported by bittune",
            )
        except Exception as exc:  # network, auth, permissions: all end the same way for the user
            # An HTTP error may echo the request; the token must not reach the terminal or a CI log.
            first = redact(str(exc).splitlines()[0] if str(exc) else "")
            first = first.replace(token, "***") if token else first
            raise BittuneError(
                f"upload to {repo} failed ({type(exc).__name__}: {first})",
                hint="check the network, your token's write access to the repo, and HF_HUB_OFFLINE",
            ) from None
    return {"repo": repo, "dry_run": False, "url": str(url), "files": staged["files"], "private": private}
