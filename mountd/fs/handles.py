"""The mount's open files and directories by handle number, and what happens
to open readers when their file's name goes or moves (unlink, rename).

Files open when their name goes keep their bytes, as POSIX has it: a handle
reading one gets a staged copy of the version it opened before storage
deletes it (`keep_open_readers`); a handle reading a file renamed through
the mount follows it to its new name (`follow_readers`).
"""

from __future__ import annotations

import errno
import itertools
import logging
import threading
from dataclasses import dataclass, field

from mountd.errors import MountdError
from mountd.fs.errors import FsError
from mountd.fs.listing import DirListing
from mountd.fs.reader import FileReader
from mountd.fs.writeback import StagedFile, WriteBack
from mountd.paths import is_within
from mountd.storage.base import Entry, ObjectStore

log = logging.getLogger(__name__)


@dataclass
class OpenFile:
    entry: Entry | None  # what storage held at open; None for a file created here
    reader: FileReader | None  # reads of that version (None: opened for writing)
    staged: StagedFile | None = None  # reads and writes go to the staged copy
    append: bool = False
    writable: bool = False  # only a writer's close uploads: a reader's must not publish its unfinished bytes
    lock: threading.Lock = field(default_factory=threading.Lock)  # staged set once
    released: bool = False  # closed: a copy made for it now would have no one to release it


class Handles:
    """Open files and directories; handle numbers are never reused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, DirListing] = {}
        self._next = itertools.count(1)

    def add(self, handle: OpenFile) -> int:
        with self._lock:
            fh = next(self._next)
            self._files[fh] = handle
        return fh

    def add_dir(self, listing: DirListing) -> int:
        with self._lock:
            dh = next(self._next)
            self._dirs[dh] = listing
        return dh

    def __getitem__(self, fh: int) -> OpenFile:
        """The open file `fh`; EBADF if there is none."""
        handle = self._files.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        return handle

    def dir(self, dh: int) -> DirListing:
        listing = self._dirs.get(dh)
        if listing is None:
            raise FsError(errno.EBADF)
        return listing

    def pop(self, fh: int) -> OpenFile | None:
        with self._lock:
            return self._files.pop(fh, None)

    def pop_dir(self, dh: int) -> None:
        with self._lock:
            self._dirs.pop(dh, None)

    def __len__(self) -> int:
        return len(self._files)

    def readers(self) -> int:
        """How many files are open for reading from storage."""
        with self._lock:
            return sum(1 for h in self._files.values() if h.reader is not None)

    def _reading(self, store_path: str, below: bool) -> list[OpenFile]:
        """The handles reading the file at `store_path` from storage (with
        `below`, also the files under it)."""
        with self._lock:
            return [h for h in self._files.values() if h.staged is None and h.entry is not None
                    and (is_within(h.entry.path, store_path) if below else h.entry.path == store_path)]

    def keep_open_readers(self, writeback: WriteBack, store_path: str) -> None:
        """Before the file at `store_path` leaves storage (unlink, or a
        rename over it): give its handles open for reading a staged copy of
        the version they opened, so they keep reading it. Costs a download
        of the file, made only when such a handle exists."""
        for handle in self._reading(store_path, below=False):
            try:
                # (mypy infers no type for a lambda with a default argument)
                sf: StagedFile | None = writeback.open(store_path, lambda entry=handle.entry: entry,  # type: ignore[misc]
                                                       truncate=False)
            except (MountdError, OSError) as e:
                log.error("%s: deleted while open, and no copy could be kept for its reader (%s): its reads fail",
                          store_path, e)
                continue
            with handle.lock:
                if not handle.released:
                    handle.staged, sf = sf, None
                    if handle.reader is not None:
                        handle.reader.close()
            if sf is not None:  # released meanwhile: nobody needs the copy
                writeback.release(sf)

    def follow_readers(self, store: ObjectStore, src: str, dst: str):
        """Before storage renames `src` (a file or a directory) to `dst`: the
        handles reading the version storage holds now, and (after the
        rename, by calling the result) point them at the new name. A copy
        (blob) has another etag; a handle whose version storage no longer
        held is left as it is and finds it gone."""
        current = []
        for handle in self._reading(src, below=True):
            assert handle.entry is not None  # a reader of a version storage held
            try:
                if store.stat(handle.entry.path).etag == handle.entry.etag:
                    current.append(handle)
            except MountdError:
                pass

        def follow() -> None:
            for handle in current:
                assert handle.entry is not None  # checked above
                try:
                    entry = store.stat(dst + handle.entry.path[len(src):])
                except MountdError:
                    continue
                if entry.size != handle.entry.size:
                    continue
                with handle.lock:
                    handle.entry = entry
                    if handle.reader is not None:
                        handle.reader.follow(entry)
        return follow
