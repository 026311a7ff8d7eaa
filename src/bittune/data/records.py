"""Read raw rows from local files or the Hugging Face Hub, remembering where each row came from.

Every row becomes a :class:`Record` whose ``where`` is what an error message should point at:
``path:line`` for JSON Lines and CSV (1-based physical line), ``path[i]`` for a JSON array (0-based element
index, as ``jq`` writes it), ``path:row N`` for Parquet and ``id[split]:row N`` for hub datasets (1-based).
Nothing here imports ``datasets`` or ``pyarrow`` until a file actually needs it.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bittune.errors import DataError

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet")
_EXT_HINT = "use a .jsonl, .json (array of objects), .csv or .parquet file, or a hub dataset id like 'owner/name'"
# owner/name, optionally ':split'; letters, digits, '-', '_', '.' as the Hub allows.
_HUB_ID = re.compile(r"^(?P<id>[A-Za-z0-9][\w.-]*/[\w.-]+)(?::(?P<split>[\w.-]+))?$")


@dataclass
class Record:
    """One raw row and where it came from.

    Attributes:
        data: The row as a dict of column name to value.
        where: Location for error messages, e.g. ``data/train.jsonl:17``.
    """

    data: dict[str, Any]
    where: str


def looks_like_hub_id(source: str) -> bool:
    """Whether ``source`` reads as a hub dataset id (``owner/name`` or ``owner/name:split``, no file extension)."""
    m = _HUB_ID.match(source)
    if not m:
        return False
    suffix = Path(m.group("id")).suffix.lower()
    # 'HuggingFaceH4/ultrachat_200k' has no suffix; 'data/train.jsonl' has one and is a missing file instead.
    return suffix not in (*SUPPORTED_EXTENSIONS, ".txt", ".tsv", ".gz", ".zip", ".yaml", ".yml")


def read_records(source: str, split: str = "train", max_rows: int | None = None) -> list[Record]:
    """Read all rows of a data source.

    Args:
        source: A ``.jsonl``/``.json``/``.csv``/``.parquet`` file, a directory written by
            ``datasets.save_to_disk``, or a hub dataset id ``owner/name`` (optionally ``owner/name:split``).
        split: Split to load for hub ids and saved dataset dicts (an explicit ``:split`` suffix wins).
        max_rows: Stop after this many rows (the first ones in file order).

    Returns:
        The rows, in file order.

    Raises:
        DataError: The file is missing, empty, has an unsupported extension, or is malformed.
    """
    path = Path(source)
    if path.is_dir():
        return _read_saved_dataset(path, split, max_rows)
    if not path.exists():
        if looks_like_hub_id(source):
            return _read_hub(source, split, max_rows)
        raise DataError(
            f"{source}: data file not found",
            hint="check the path (relative paths are resolved from the directory you run bittune in)",
        )
    ext = path.suffix.lower()
    if ext not in SUPPORTED_EXTENSIONS:
        raise DataError(f"{source}: unsupported data file extension '{ext or '(none)'}'", hint=_EXT_HINT)
    if path.stat().st_size == 0:
        raise DataError(f"{source}: the file is empty", hint="add some rows, or use another file")
    if ext == ".parquet":
        records = _read_parquet(path, max_rows)
    else:
        text = _decode(path)
        if ext == ".jsonl":
            records = _read_jsonl(text, source, max_rows)
        elif ext == ".json":
            records = _read_json(text, source, max_rows)
        else:
            records = _read_csv(text, source, max_rows)
    if not records:
        raise DataError(f"{source}: the file has no rows", hint="add some rows, or use another file")
    return records


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        # utf-8-sig drops the byte-order mark that Excel and Notepad put in front of UTF-8 files.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            hint="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8 in.jsonl > out.jsonl)",
        ) from None


def _check_object(value: Any, where: str, kind: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        got = "an array" if isinstance(value, list) else f"a {type(value).__name__}"
        raise DataError(
            f"{where}: each {kind} must be a JSON object with named fields, got {got}",
            hint='write each row as an object, e.g. {"text": "..."}',
        )
    return value


def _read_jsonl(text: str, source: str, max_rows: int | None) -> list[Record]:
    records: list[Record] = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue  # blank lines (often a trailing one) carry no row
        where = f"{source}:{lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(
                f"{where}: invalid JSON at column {exc.colno}: {exc.msg}",
                hint="each line of a .jsonl file must be one complete JSON object",
            ) from None
        records.append(Record(_check_object(value, where, "line"), where))
        if max_rows is not None and len(records) >= max_rows:
            break
    return records


def _read_json(text: str, source: str, max_rows: int | None) -> list[Record]:
    if not text.strip():
        raise DataError(f"{source}: the file is empty", hint="add some rows, or use another file")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and text.lstrip().startswith("{"):
            raise DataError(
                f"{source}:{exc.lineno}: this .json file holds one JSON object per line (JSON Lines)",
                hint=f"rename it to {Path(source).with_suffix('.jsonl').name}",
            ) from None
        raise DataError(
            f"{source}:{exc.lineno}: invalid JSON at column {exc.colno}: {exc.msg}",
            hint="a .json data file must be one JSON array of objects",
        ) from None
    if not isinstance(value, list):
        keys = ", ".join(list(value)[:5]) if isinstance(value, dict) else ""
        raise DataError(
            f"{source}: a .json data file must be an array of objects, got a {type(value).__name__}"
            + (f" with keys {keys}" if keys else ""),
            hint='write [{"text": ...}, {"text": ...}], or use JSON Lines (.jsonl) with one object per line',
        )
    if max_rows is not None:
        value = value[:max_rows]
    return [Record(_check_object(v, f"{source}[{i}]", "element"), f"{source}[{i}]") for i, v in enumerate(value)]


def _read_csv(text: str, source: str, max_rows: int | None) -> list[Record]:
    # Long documents exceed csv's default 128 KiB field limit; a data file's cells may be any length.
    csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))
    reader = csv.reader(io.StringIO(text, newline=""))
    header: list[str] | None = None
    records: list[Record] = []
    start = 1  # physical line on which the next record starts (quoted fields may span lines)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise DataError(
                f"{source}:{start}: malformed CSV ({exc})", hint="check the quoting on that line, or re-export the file"
            ) from None
        where = f"{source}:{start}"
        start = reader.line_num + 1
        if not row or all(not cell.strip() for cell in row):
            continue
        if header is None:
            header = [h.strip() for h in row]
            dupes = sorted({h for h in header if header.count(h) > 1})
            if dupes:
                raise DataError(
                    f"{where}: duplicate column name(s) in the header: {', '.join(dupes)}",
                    hint="give every column a distinct name",
                )
            continue
        if len(row) != len(header):
            raise DataError(
                f"{where}: row has {len(row)} fields but the header has {len(header)} ({', '.join(header)})",
                hint="quote fields that contain commas or line breaks with double quotes",
            )
        records.append(Record(dict(zip(header, row)), where))
        if max_rows is not None and len(records) >= max_rows:
            break
    if header is None:
        raise DataError(f"{source}: the file is empty", hint="add a header line and some rows")
    return records


def _read_parquet(path: Path, max_rows: int | None) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow", hint="pip install pyarrow") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises several types for corrupt files; all mean "not readable"
        raise DataError(f"{path}: not a readable Parquet file ({exc})", hint="re-export the file") from None
    if max_rows is not None:
        table = table.slice(0, max_rows)
    return [Record(row, f"{path}:row {i}") for i, row in enumerate(table.to_pylist(), start=1)]


def _rows_to_records(rows: Any, name: str, max_rows: int | None) -> list[Record]:
    if max_rows is not None and len(rows) > max_rows:
        rows = rows.select(range(max_rows))
    return [Record(dict(row), f"{name}:row {i}") for i, row in enumerate(rows, start=1)]


def _read_saved_dataset(path: Path, split: str, max_rows: int | None) -> list[Record]:
    if not any((path / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        raise DataError(
            f"{path}: is a directory, not a data file or a dataset saved with datasets' save_to_disk",
            hint="point at a .jsonl/.json/.csv/.parquet file inside it",
        )
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or version-mismatched save: the user has to re-save it
        raise DataError(
            f"{path}: could not load the saved dataset ({exc})", hint="re-save it with save_to_disk"
        ) from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(
                f"{path}: saved dataset has no split '{split}' (it has: {', '.join(ds)})",
                hint="set data.split to one of those",
            )
        ds = ds[split]
    return _rows_to_records(ds, f"{path}[{split}]", max_rows)


def _read_hub(source: str, split: str, max_rows: int | None) -> list[Record]:
    m = _HUB_ID.match(source)
    assert m is not None  # looks_like_hub_id said so
    dataset_id, split = m.group("id"), m.group("split") or split
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE") or os.environ.get(
        "HF_DATASETS_OFFLINE", ""
    ).upper() in ("1", "ON", "YES", "TRUE")
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"{source}: loading hub datasets needs the 'datasets' package", hint="pip install datasets"
        ) from None
    try:
        ds = datasets.load_dataset(dataset_id, split=split)
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise DataError(
                f"{source}: dataset has no split '{split}' ({_first_line(exc)})",
                hint=f"write the split after a colon, e.g. {dataset_id}:test, or set data.split",
            ) from None
        raise DataError(
            f"{source}: could not load the hub dataset ({_first_line(exc)})", hint="check the dataset id"
        ) from None
    except Exception as exc:  # network, auth and not-found errors come in many types; all are user-fixable
        if offline:
            raise DataError(
                f"{source}: not a local file, and hub dataset '{dataset_id}' could not be found in the local "
                f"cache while offline (HF_HUB_OFFLINE=1): {_first_line(exc)}",
                hint="fix the path if you meant a local file, or unset HF_HUB_OFFLINE to download the dataset",
            ) from None
        raise DataError(
            f"{source}: not a local file, and hub dataset '{dataset_id}' could not be loaded: {_first_line(exc)}",
            hint="fix the path if you meant a local file; for a private dataset run 'hf auth login' first",
        ) from None
    return _rows_to_records(ds, f"{dataset_id}[{split}]", max_rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
