"""The one storage interface everything above `mountd.storage` talks to.

Paths are relative to the datastore's root, '/'-separated, with no leading or
trailing slash; the root itself is "". Backends raise the errors of
`mountd.errors` (NotFound, Stale, AlreadyExists, NotEmpty, StorageError), never
SDK exceptions, so callers stay independent of the cloud behind them.
"""

from __future__ import annotations

import posixpath
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator

from mountd.errors import NotFound

# Called with the number of bytes just moved; used for progress bars.
ProgressCallback = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Entry:
    """What storage knows of one file or directory."""

    path: str  # relative to the datastore root
    is_dir: bool
    size: int = 0
    mtime: float = 0.0  # seconds since the epoch
    etag: str | None = None
    md5: bytes | None = None  # content MD5 where storage keeps one
    links: int = 0  # a directory's link count where storage keeps one (a local filesystem), else 0

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)


@dataclass(frozen=True, slots=True)
class NameLimits:
    """The longest names a store accepts, counted as it counts them: a
    local filesystem in UTF-8 bytes, Azure in characters. `path` is the whole
    path from the store's root; `segments`, where set, caps its components."""

    component: int
    path: int
    segments: int | None = None
    in_bytes: bool = False

    def too_long(self, path: str) -> bool:
        """`path` (a store path) is one the store would refuse for its length."""
        if self.segments is not None and path.count("/") >= self.segments:
            return True
        if len(path) * (4 if self.in_bytes else 1) <= min(self.component, self.path):
            return False  # the common case, on every lookup: short whatever its characters
        size = (lambda s: len(s.encode("utf-8", "surrogateescape"))) if self.in_bytes else len
        if size(path) > self.path:
            return True
        return any(size(part) > self.component for part in path.split("/"))


# POSIX's NAME_MAX and PATH_MAX less its terminating NUL: what a store that
# says nothing else is held to.
DEFAULT_NAME_LIMITS = NameLimits(component=255, path=4095, in_bytes=True)


class ObjectStore(ABC):
    """A datastore's contents: files in a tree of directories."""

    #: a short description for messages, e.g. "blob container data@acct"
    description: str = "store"

    @abstractmethod
    def stat(self, path: str) -> Entry:
        """The entry at path; NotFound if there is none. The root is a dir."""

    @abstractmethod
    def list_dir(self, path: str) -> Iterator[Entry]:
        """The entries directly under directory `path`, fetched page by page
        as the iterator is consumed. NotFound if `path` is not a directory."""

    @abstractmethod
    def walk(self, prefix: str = "") -> Iterator[Entry]:
        """Every file whose path starts with the plain string `prefix`, and
        every directory that exists in its own right (a marker blob, a real
        directory) under it. Order: storage's own (lexicographic for blob)."""

    def read(self, path: str, offset: int, length: int, etag: str | None = None) -> bytes | bytearray:
        """Up to `length` bytes at `offset` (fewer only at end of file), as a
        bytes-like object (bytes or bytearray).
        With `etag`, raises Stale if the object is no longer that version."""
        if length <= 0:
            return b""
        buf = bytearray(length)
        got = self.read_into(path, offset, memoryview(buf), etag)
        # a bytearray is returned as is: copying large reads doubles peak memory
        return buf if got == length else buf[:got]

    @abstractmethod
    def read_into(self, path: str, offset: int, view: memoryview, etag: str | None = None) -> int:
        """Like read, into a caller's buffer (no allocation per call); returns
        the number of bytes placed at the start of `view`."""

    def read_stream(self, path: str, offset: int, length: int, etag: str | None, buf: memoryview, sink) -> int:
        """Read a long range cut into pieces of len(buf) bytes from `offset`
        (the last may be shorter), handing each to `sink(offset, piece)`
        once full; returns the bytes read. A piece is valid only during the
        call, unless `sink` returns a new buffer to read the next piece into
        (it may then keep the piece). Backends that can stream one request
        override this."""
        done = 0
        while done < length:
            n = self.read_into(path, offset + done, buf[:min(len(buf), length - done)], etag)
            if not n:
                break
            fresh = sink(offset + done, buf[:n])
            if fresh is not None:
                buf = fresh
            done += n
        return done

    @abstractmethod
    def write_file(self, path: str, local_path: str, overwrite: bool = True,
                   progress: ProgressCallback | None = None) -> Entry:
        """Upload a local file to `path`, replacing it only if `overwrite`
        (else AlreadyExists). Returns the new entry."""

    @abstractmethod
    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> Entry:
        """Store a small object in one request."""

    @abstractmethod
    def delete(self, path: str) -> None:
        """Delete a file; NotFound if it does not exist."""

    @abstractmethod
    def mkdir(self, path: str) -> None:
        """Create a directory (a marker blob on blob storage) and its parents."""

    @abstractmethod
    def rmdir(self, path: str) -> None:
        """Remove an empty directory; NotEmpty if it has entries."""

    @abstractmethod
    def rename(self, src: str, dst: str) -> None:
        """Move a file to a new path, replacing what is there."""

    def rename_dir(self, src: str, dst: str) -> None:
        """Move directory `src` with everything in it to `dst` (absent, or
        an empty directory the caller has removed). This default is for
        storage whose directories are only their contents and markers
        (blob): each file is renamed in turn, then the markers are made
        under the new name and removed under the old. Not atomic: a
        failure part way leaves both names populated. Storage with a
        directory rename of its own overrides it."""
        dirs = []
        for entry in self.walk(src + "/"):
            if entry.is_dir:
                dirs.append(entry.path)
            else:
                self.rename(entry.path, dst + entry.path[len(src):])
        self.mkdir(dst)
        for d in sorted(dirs, reverse=True):
            self.mkdir(dst + d[len(src):])
            self.rmdir(d)
        try:
            self.rmdir(src)
        except NotFound:
            pass

    def name_limits(self) -> NameLimits:
        """The longest names this store accepts (see NameLimits): a mount
        refuses longer ones when they are created (ENAMETOOLONG), rather
        than when their upload fails."""
        return DEFAULT_NAME_LIMITS

    def check(self) -> None:
        """Raise Unreachable/ConfigError if the store cannot be used at all
        (no such container, credentials refused, endpoint down)."""
        self.stat("")

    def close(self) -> None:  # noqa: B027 - a default: a store without connections has nothing to do
        """Release connections."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
