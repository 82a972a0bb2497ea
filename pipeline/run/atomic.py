"""Atomic file writes: a reader (or a rerun) never sees half a file.

Every file the pipeline writes (shard files, run.json, configs.parquet, the oracle's files, the report)
goes through `write_atomic`: written under a temporary name in the same folder, fsynced, renamed into
place, and the folder fsynced, so a crash leaves at most a `.*.tmp` file behind. In an object store
(`pipeline.run.location.StorePath`) the file is written locally first and then uploaded whole in one request,
which the store makes visible all at once.
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

from pipeline.run.location import RunPath, StorePath

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
    store, `write` fills a local temporary file that is then uploaded as one object.

    A full disk (or quota) raises OSError("cannot write <path>: No space left on device"), temp file removed.
    """
    if isinstance(path, StorePath):
        with tempfile.TemporaryDirectory(prefix="dynoracle-") as folder:
            temp = Path(folder) / path.name
            write(temp)
            path.write_bytes(temp.read_bytes())
        return
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


def replace_folder(folder: RunPath, write: Callable[[Path], object]) -> None:
    """Replace `folder` by the files `write(staging_folder)` makes, as a set: whole or not at all.

    The files are written (each with `write_atomic`) into a fresh hidden sibling folder; then the old folder
    is renamed aside, the new one into place, and the old one deleted. A failure while writing leaves the
    old folder as it was; a crash between the two renames leaves no folder (never a mix of old and new).
    An object store has no rename (`_replace_store_folder`): there the set is only as whole as the uploads.
    """
    if isinstance(folder, StorePath):
        _replace_store_folder(folder, write)
        return
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


def _replace_store_folder(folder: StorePath, write: Callable[[Path], object]) -> None:
    """The closest an object store comes to `replace_folder`: the files are written in a local staging
    folder (a failure there leaves the stored folder as it was), then each is uploaded as one whole object,
    then the old set's objects the new set lacks are deleted. A crash during the uploads can leave old and
    new files side by side; rerunning the writer (e.g. `dynoracle reduce`) makes the set whole again.
    """
    with tempfile.TemporaryDirectory(prefix="dynoracle-") as staging:
        write(Path(staging))
        new = sorted(p.name for p in Path(staging).iterdir() if p.is_file())
        old = {p.name for p in folder.iterdir() if p.is_file()} if folder.is_dir() else set()
        for name in new:
            (folder / name).write_bytes((Path(staging) / name).read_bytes())
    for name in sorted(old - set(new)):
        (folder / name).unlink(missing_ok=True)


def write_parquet(table: pa.Table, path: RunPath) -> None:
    """Atomically write a Parquet file with page checksums, so later corruption is detectable on read."""
    write_atomic(path, lambda temp: pq.write_table(table, temp, write_page_checksum=True))


def write_json(data: dict[str, Any], path: RunPath) -> None:
    write_atomic(path, lambda temp: temp.write_text(json.dumps(data, indent=1, default=str) + "\n"))
