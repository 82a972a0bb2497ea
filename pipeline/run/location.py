"""Where a run folder lives: a local path, or an object-store URI (`s3://bucket/run`, `gs://bucket/run`).

`locate` turns what the user typed into a `pathlib.Path` or a `StorePath`; a StorePath offers the part of
pathlib's interface the run folder's readers and writers use (`/`, `name`, `parent`, `is_file`, `glob`,
`read_text`, `stat`, `unlink`, ...) on top of pyarrow's filesystems, so one code path serves both. Object
stores have no rename and no directories: a file is written whole in one upload (`write_bytes`), which
appears at once or not at all, and a folder exists while some object lies under its prefix.

Credentials and endpoints come from pyarrow's usual sources (AWS_* environment variables, ~/.aws,
GOOGLE_APPLICATION_CREDENTIALS, or query parameters of the URI such as `?endpoint_override=host:port`).
"""

from __future__ import annotations

import fnmatch
import posixpath
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator, Union

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq


class StorePath:
    """A file or folder in an object store; `str()` gives back its URI."""

    def __init__(self, fs: pafs.FileSystem, path: str, scheme: str):
        self.fs, self.path, self.scheme = fs, path.rstrip("/"), scheme

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}"

    def __repr__(self) -> str:
        return f"StorePath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StorePath) and (self.scheme, self.path) == (other.scheme, other.path)

    def __lt__(self, other: StorePath) -> bool:
        return self.path < other.path

    def __hash__(self) -> int:
        return hash((self.scheme, self.path))

    def __truediv__(self, name: str) -> StorePath:
        return StorePath(self.fs, posixpath.join(self.path, str(name)), self.scheme)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def parent(self) -> StorePath:
        return StorePath(self.fs, posixpath.dirname(self.path), self.scheme)

    def resolve(self) -> StorePath:
        return self

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        return self._info().type == pafs.FileType.Directory

    def stat(self) -> SimpleNamespace:
        """Size in bytes and modification time in ns (0 for a prefix, which has none); FileNotFoundError if absent."""
        info = self._info()
        if info.type == pafs.FileType.NotFound:
            raise FileNotFoundError(f"{self} does not exist")
        return SimpleNamespace(st_size=info.size or 0, st_mtime_ns=info.mtime_ns or 0)

    def iterdir(self) -> Iterator[StorePath]:
        """The folder's direct children, from one listing."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=False)
        for info in self.fs.get_file_info(selector):
            yield StorePath(self.fs, info.path, self.scheme)

    def glob(self, pattern: str) -> Iterator[StorePath]:
        """Direct children whose name matches `pattern` (no '/' in it), from one listing."""
        if "/" in pattern:
            raise ValueError(f"only patterns within one folder are supported, got {pattern!r}")
        return (child for child in self.iterdir() if fnmatch.fnmatchcase(child.name, pattern))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Nothing to do: an object store's folder appears with its first object."""

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> None:
        """One upload: readers see the old object or the whole new one, never a part."""
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            if not missing_ok:
                raise


RunPath = Union[Path, StorePath]


def locate(where: str | Path | StorePath) -> RunPath:
    """A path as typed, or a StorePath for a URI (`scheme://...`; `file://` is a local path).

    Raises ValueError for a scheme pyarrow has no filesystem for (or cannot reach with the credentials
    it finds), naming the URI.
    """
    if isinstance(where, (Path, StorePath)):
        return where
    text = str(where)
    if "://" not in text:
        return Path(text)
    scheme = text.split("://", 1)[0].lower()
    if scheme == "file":
        return Path(text[len("file://"):])
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"cannot open {text}: {str(exc).splitlines()[0]}") from None
    return StorePath(fs, path, scheme)


def read_parquet(path: RunPath, **kwargs: Any) -> pa.Table:
    """Read a Parquet file of a run folder with its page checksums verified (a damaged file raises
    OSError or an ArrowException instead of yielding wrong rows)."""
    if isinstance(path, StorePath):
        return pq.read_table(path.path, filesystem=path.fs, page_checksum_verification=True, **kwargs)
    return pq.read_table(path, page_checksum_verification=True, **kwargs)


def parquet_dataset(paths: list[RunPath]) -> ds.Dataset:
    """An Arrow dataset over exactly these Parquet files (all local or all in one store), no partitioning:
    readers scan only the columns and row groups they need, through pyarrow's filesystem."""
    stores = [p for p in paths if isinstance(p, StorePath)]
    if stores:
        return ds.dataset([p.path for p in stores], format="parquet", filesystem=stores[0].fs)
    return ds.dataset([str(p) for p in paths], format="parquet")
