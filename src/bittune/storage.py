"""Everything bittune writes to disk goes through here: complete-or-absent folders and files, and the rules for
where an output may go.

- :func:`atomic_dir` fills a hidden temp folder beside the target, flushes it, and renames it into place in one
  step (``COMPLETE`` written last); :func:`atomic_file` and :func:`atomic_write_text` do the same for one file.
  A job killed at any moment leaves the previous state untouched and nothing that looks finished but is not.
- :func:`remove_dir` renames a folder away before deleting it; :func:`sweep_stale_temp` removes what killed jobs
  left under hidden names.
- :func:`check_output_path` is the one rule for output paths: never write over a user's files; replace (or
  continue) an earlier output of bittune's own only when the caller says it may.

Standard library only: importing this module costs nothing.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bittune.errors import BittuneError, StorageError

COMPLETE = "COMPLETE"
# Hidden names under which bittune writes, replaces or deletes folders (the writer's pid at the end).
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")


def fsync_dir(path: Path) -> None:
    """Flush a directory entry (the rename itself) to disk where the OS allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for f in path.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``).

    Returns False, having changed nothing, where the OS or file system cannot do it.
    """
    import ctypes
    import errno
    import sys

    if not sys.platform.startswith("linux"):
        return False
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)  # glibc >= 2.28
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def atomic_dir(final: Path, write: Callable[[Path], None], *, marker: bool = True) -> Path:
    """Create directory ``final`` atomically: ``write(tmp)`` fills a temp dir that is then renamed into place.

    An existing ``final`` is replaced only after the new one is complete, by an atomic swap where the OS has one
    (:func:`exchange_paths`), so ``final`` is never missing in between. ``marker=False`` leaves out the
    ``COMPLETE`` file, for folders handed to other tools (an HF export uploaded to the Hub).

    Raises:
        StorageError: when the disk is full or not writable; the previous ``final`` is untouched.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # callers check the path first (check_output_path); this is the race, or /proc-like
        raise StorageError(f"cannot create {final.parent}: {exc.strerror}", hint="choose a writable location") from None
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write(tmp)
        if marker:
            (tmp / COMPLETE).write_text("ok\n")
        _fsync_tree(tmp)
        if final.exists() and exchange_paths(tmp, final):
            # One atomic swap: the path always holds the previous or the new complete folder.
            shutil.rmtree(tmp, ignore_errors=True)  # now the previous one; a kill here leaves a hidden .tmp-*
        elif final.exists():  # no atomic swap here: a kill between the renames leaves the previous one as .old-*
            old = final.parent / f".old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise StorageError(
            f"could not write {final}: {exc.strerror or exc}",
            hint="free disk space (or fix permissions) and run again; the previous complete state is untouched",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a hidden temp path beside ``final`` to write one file to; when the block ends without error the file
    is flushed and renamed onto ``final``, so readers see the previous file or the complete new one. The temp file
    is removed on every way out.

    Raises:
        StorageError: on an OSError in the block or the rename (disk full, not writable); ``final`` is untouched.
    """
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        raise StorageError(
            f"could not write {final}: {exc.strerror or exc}", hint="free disk space or fix permissions, then retry"
        ) from None
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write a small text file so readers see the old or the new content, never half of it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def is_complete(path: Path, *required: str) -> bool:
    """Whether ``path`` was finished by :func:`atomic_dir` (its ``COMPLETE`` marker) and holds ``required`` files."""
    path = Path(path)
    return (path / COMPLETE).is_file() and all((path / name).is_file() for name in required)


def read_json(path: str | Path) -> Any:
    """The JSON in ``path`` (a file bittune wrote: a summary, a report, a sidecar), or one clear error naming the
    file and the line where it stops being JSON (edited by hand, cut short by a full disk)."""
    import json

    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StorageError(
            f"{path}:{exc.lineno}: not valid JSON ({exc.msg}, column {exc.colno})",
            hint="restore the file (bittune wrote it; a copy, or the run that wrote it, has it whole)",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise StorageError(f"{path} is unreadable ({type(exc).__name__}: {exc})", hint="restore the file") from None


def remove_dir(path: Path) -> None:
    """Delete a directory so that a kill midway never leaves a half-deleted folder under its real name.

    The folder is first renamed to a hidden ``.del-*`` name (one atomic step), then deleted; leftovers of a kill
    are swept by :func:`sweep_stale_temp` on the next start.
    """
    doomed = path.parent / f".del-{path.name}-{os.getpid()}"
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sweep_stale_temp(folder: Path) -> None:
    """Remove ``.tmp-*``/``.old-*``/``.del-*`` folders left by killed jobs. Call only while holding the run lock."""
    if not folder.is_dir():
        return
    for p in folder.iterdir():
        if p.is_dir() and p.name.startswith(TEMP_PREFIXES):
            shutil.rmtree(p, ignore_errors=True)


def check_output_path(
    path: str | Path,
    *,
    flag: str = "--out",
    file: str | None = None,
    noun: str = "an earlier output",
    ours: Collection[str] = (),
    earlier: Collection[str] | None = None,
    may_replace: bool = False,
    replace_hint: str | None = None,
    parent_must_exist: bool = False,
    suffix: str | None = None,
    error: type[BittuneError] = StorageError,
) -> Path:
    """The one rule for where an output goes; call it before any work is done. Returns the expanded path.

    An output folder may be written when it does not exist, is empty, or holds an earlier output of bittune's own
    that the caller ``may_replace`` (an export written again, a run resumed). Anything else in it belongs to the
    user and is never written over. An output file is written when it does not exist, or may be replaced.

    Args:
        flag: How the user named the path (``--out``, ``output_dir``), for messages.
        file: The output is one file, named like this example (``model.gguf``); default: a folder.
        noun: What an earlier output is called in messages (``a run``).
        ours: Top-level names bittune itself writes into such a folder; hidden names (``.lock``, temp folders)
            always count as bittune's.
        earlier: Names whose presence means an earlier output is there (default: ``ours``). Other names of
            ``ours`` alone (e.g. a run's ``run_config.yaml`` before its first step) do not need ``may_replace``.
        may_replace: An earlier output of bittune's may be replaced or continued.
        replace_hint: The fix when it may not (e.g. "pass --resume to continue it").
        parent_must_exist: Refuse a missing parent folder (else it is created when writing).
        suffix: The file name must end in this.
        error: The error class to raise (``StorageError`` unless the caller's convention differs).

    Raises:
        ``error``: naming ``flag``, the path and what is in the way, with a fix.
    """
    out = Path(path).expanduser()
    if file and out.is_dir():
        raise error(f"{flag} {out} is a directory", hint=f"give a file name, e.g. {flag} {file}")
    if not file and out.exists() and not out.is_dir():
        raise error(f"{flag} {out} is a file", hint="give a folder path")
    if suffix and out.suffix != suffix:
        raise error(f"{flag} {out} does not end in {suffix}", hint=f"name the file like model{suffix}")
    parent = out.parent
    nearest = next((p for p in out.parents if p.exists()), None)  # where the missing folders would be made
    if nearest is not None and not nearest.is_dir():
        raise error(f"{flag} {out}: {nearest} is a file, not a folder", hint="choose a path under a folder")
    if parent_must_exist and not parent.is_dir():
        raise error(f"{flag} {out}: the folder {parent} does not exist", hint=f"create it first (mkdir -p {parent})")
    if nearest is not None and not os.access(nearest, os.W_OK):
        raise error(f"{flag} {out}: the folder {nearest} is not writable", hint="choose a writable location")
    if file:
        if out.exists() and not may_replace:
            raise error(f"{flag} {out} already exists", hint=replace_hint or "choose a new file name or delete it")
        return out
    if not out.is_dir():
        return out
    names = {p.name for p in out.iterdir()}
    held = sorted(n for n in names if n in (ours if earlier is None else earlier))
    others = sorted(n for n in names if n not in ours and not n.startswith("."))
    if held and not may_replace:
        raise error(
            f"{flag} {out} already holds {noun} ({', '.join(held)})",
            hint=replace_hint or "choose a new folder",
        )
    if others and not held:
        raise error(
            f"{flag} {out} already holds other files (the folder is not empty: {', '.join(others[:3])}"
            + (", ..." if len(others) > 3 else "")
            + ")",
            hint="choose a new folder, or an empty one (bittune never writes over files it did not write)",
        )
    return out
