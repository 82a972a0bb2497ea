"""Atomic file writes: a reader (or a rerun) never sees half a file.

Every file the pipeline writes (shard files, run.json, configs.parquet, the oracle's files, the report)
goes through `write_atomic`: written under a temporary name in the same folder, fsynced, renamed into
place, and the folder fsynced, so a crash leaves at most a `.*.tmp` file behind.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.parquet as pq

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Write via `write(temp_path)` to a temporary file beside `path`, fsync, then rename into place:
    a reader never sees half a file, and a crash leaves at most a `.*.tmp` file behind.

    A full disk (or quota) raises OSError("cannot write <path>: No space left on device"), temp file removed.
    """
    temp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; results are for everyone the umask allows
        os.close(fd)
        write(Path(temp))
        with open(temp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        if temp is not None:
            Path(temp).unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(f"cannot write {path}: {os.strerror(exc.errno)}") from None
        raise
    _fsync_dir(path.parent)


def replace_folder(folder: Path, write: Callable[[Path], object]) -> None:
    """Replace `folder` by the files `write(staging_folder)` makes, as a set: whole or not at all.

    The files are written (each with `write_atomic`) into a fresh hidden sibling folder; then the old folder
    is renamed aside, the new one into place, and the old one deleted. A failure while writing leaves the
    old folder as it was; a crash between the two renames leaves no folder (never a mix of old and new).
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".tmp"))
    old = None
    try:
        os.chmod(staging, 0o777 & ~_UMASK)
        write(staging)
        if folder.exists():
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.", suffix=".old.tmp"))
            os.replace(folder, old / folder.name)
        os.replace(staging, folder)
        _fsync_dir(folder.parent)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None and not folder.exists():
            os.replace(old / folder.name, folder)
        if isinstance(exc, OSError) and str(staging) in str(exc):  # name the file, not the staging folder
            raise OSError(str(exc).replace(str(staging), str(folder))) from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def write_parquet(table: pa.Table, path: Path) -> None:
    """Atomically write a Parquet file with page checksums, so later corruption is detectable on read."""
    write_atomic(path, lambda temp: pq.write_table(table, temp, write_page_checksum=True))


def write_json(data: dict[str, Any], path: Path) -> None:
    write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=1, default=str) + "\n"))
