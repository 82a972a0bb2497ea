"""Atomic file writes: a reader (or a rerun) never sees half a file.

Every file the pipeline writes (shard files, run.json, configs.parquet, the oracle's files, the report)
goes through `write_atomic`: written under a temporary name in the same folder, fsynced, renamed into
place, and the folder fsynced, so a crash leaves at most a `.*.tmp` file behind. In an object store
(`pipeline.location.StorePath`) the file is written locally first and then uploaded whole in one request,
which the store makes visible all at once.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.location import RunPath, StorePath

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: RunPath, write: Callable[[Path], object]) -> None:
    """Write via `write(temp_path)` to a temporary file beside `path`, fsync, then rename into place:
    a reader never sees half a file, and a crash leaves at most a `.*.tmp` file behind. For an object
    store, `write` fills a local temporary file that is then uploaded as one object."""
    if isinstance(path, StorePath):
        with tempfile.TemporaryDirectory(prefix="dynoracle-") as folder:
            temp = Path(folder) / path.name
            write(temp)
            path.write_bytes(temp.read_bytes())
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for everyone the umask allows
    os.close(fd)
    try:
        write(Path(temp))
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_parquet(table: pa.Table, path: RunPath) -> None:
    """Atomically write a Parquet file with page checksums, so later corruption is detectable on read."""
    write_atomic(path, lambda temp: pq.write_table(table, temp, write_page_checksum=True))


def write_json(data: dict[str, Any], path: RunPath) -> None:
    write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=1, default=str) + "\n"))
