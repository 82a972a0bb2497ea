"""Where dataset rows come from: local files (JSONL / JSON / Parquet, or a local mirror folder) or the hub.

Rows are plain dicts; every row carries an origin ("file.jsonl line 13", "tatsu-lab/alpaca train row 12")
so that an error about one row can name it. Reading the hub goes through `datasets.load_dataset`; when the
hub cannot be reached we fail within seconds with a hint to use local data, instead of retrying for minutes.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DATA_DIR_ENV = "DYNORACLE_DATA_DIR"
_PROBE_TIMEOUT_S = 5.0


class DataError(ValueError):
    """Bad dataset input: the message is one line that says what is wrong and where."""


@dataclass(frozen=True)
class Table:
    """Rows of one source, in source order. `rows` may be a list or a `datasets.Dataset` (read lazily)."""

    label: str
    rows: Sequence[dict]
    origins: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def origin(self, index: int) -> str:
        return self.origins[index] if self.origins is not None else f"{self.label} row {index}"


def data_dir(explicit: str | None) -> Path | None:
    """The local mirror root: the explicit one, else $DYNORACLE_DATA_DIR, else None (use the hub)."""
    chosen = explicit or os.environ.get(DATA_DIR_ENV)
    return Path(chosen) if chosen else None


def read_file(path: Path) -> Table:
    """Read a JSONL, JSON (a list of objects) or Parquet file."""
    if not path.is_file():
        raise DataError(f"no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return Table(str(path), rows, tuple(f"{path.name} row {i}" for i in range(len(rows))))
    raise DataError(f"{path}: unsupported file type {suffix or '(none)'}; use .jsonl, .json or .parquet")


def read_files(paths: Sequence[Path], label: str) -> Table:
    """Concatenate several files in the given order (a mirror folder may hold its data in parts)."""
    tables = [read_file(path) for path in paths]
    rows = [row for table in tables for row in table.rows]
    origins = tuple(origin for table in tables for origin in table.origins or ())
    return Table(label, rows, origins)


def _read_jsonl(path: Path) -> Table:
    rows, origins = [], []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            line = _utf8(raw[3:] if number == 1 and raw.startswith(BOM) else raw, path, number)  # a BOM is not data
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}: line {number} is not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}: line {number} is not a JSON object")
            rows.append(row)
            origins.append(f"{path.name} line {number}")
    return Table(str(path), rows, tuple(origins))


def _read_json(path: Path) -> Table:
    raw = path.read_bytes()
    try:
        data = json.loads(_utf8(raw[3:] if raw.startswith(BOM) else raw, path))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(f"{path}: expected a JSON list of objects")
    return Table(str(path), data, tuple(f"{path.name} item {i}" for i in range(len(data))))


BOM = b"\xef\xbb\xbf"  # UTF-8 byte-order mark, which some editors put at the start of a file


def _utf8(data: bytes, path: Path, line: int = 1) -> str:
    """`data` (from line `line` of `path` on) decoded as UTF-8; else DataError naming the file and the line."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        at = line + data[:exc.start].count(b"\n")
        raise DataError(f"{path}: line {at} is not UTF-8 text (byte 0x{data[exc.start]:02x}); "
                        "save the file as UTF-8") from None


def read_hub(hub_id: str, config: str | None, split: str, local_hint: str) -> Table:
    """Load one split of a hub dataset; offline, fail fast with `local_hint` (how to use local data instead)."""
    offline = any(os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}
                  for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not _hub_reachable():
        raise DataError(f"cannot reach the Hugging Face hub for {hub_id}; {local_hint}")
    import datasets

    try:
        table = datasets.load_dataset(hub_id, config, split=split)
    except ConnectionError as exc:
        raise DataError(f"cannot reach the Hugging Face hub for {hub_id} ({exc}); {local_hint}") from None
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"cannot load {hub_id} split {split!r} from the hub: {_first_line(exc)}") from None
    return Table(f"{hub_id} {split}", table)


def _hub_reachable() -> bool:
    """One short HTTP request to the hub endpoint: any HTTP answer means reachable (proxies are honoured)."""
    from huggingface_hub import constants

    endpoint = os.environ.get("HF_ENDPOINT") or constants.ENDPOINT
    try:
        urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=_PROBE_TIMEOUT_S)
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False
    return True


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
