"""Kernel opens: reads that arrive without a handle, by path, each path pinned
to one version of its object, so the kernel's page cache never mixes two.

On read-only mounts (unless `strict_open`) the kernel may open and close
files without asking, so that a file whose bytes are in its page cache costs
no round trip at all. Its reads then come by path, and each path reads the
version whose attributes the kernel was last told (getattr, listings). A
change is taken up when the kernel is told the new attributes; a change
found by a read (the pinned version is gone) fails that read with ESTALE and
has the kernel drop what it caches of the path (`KernelCache`) before any
byte of the new version is served.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections import OrderedDict
from typing import Callable, Literal, Protocol

from mountd.fs.errors import FsError
from mountd.fs.reader import FileReader, Reads
from mountd.storage.base import Entry

log = logging.getLogger(__name__)

# Files read without a handle whose readahead state is kept: more than the
# files a job reads at once, few enough to look through.
PATH_READERS = 64
# How long a getattr waits for the kernel to drop the pages of a version
# found gone (milliseconds, normally). Bounded: the read that found it gone
# may itself be waiting on a lookup (its name expired), which waits here.
SETTLE_TIMEOUT = 2.0


class KernelCache(Protocol):
    """What the glue offers for kernel opens: making the kernel forget what
    it caches of a path."""

    def forget_attributes(self, path: str) -> None:
        """The kernel asks for the path's attributes again at its next use
        of it (safe to call while serving a read: it waits on no page)."""

    def forget_data(self, path: str, done: Callable[[], None]) -> None:
        """The kernel drops the path's attributes and cached pages; `done`
        runs once it has (never waited for while serving a read)."""


class PinnedPaths:
    """The version each path read without a handle is pinned to, and a
    FileReader for each of the PATH_READERS paths read most recently."""

    def __init__(self, reads: Reads):
        self._reads = reads
        self.kernel: KernelCache | None = None
        self._lock = threading.Lock()
        self._pins: dict[str, Entry | None] = {}  # path -> version read without a handle; None: being dropped
        self._settling: dict[str, threading.Event] = {}  # path -> set once the kernel dropped the old pages
        self._readers: OrderedDict[str, FileReader] = OrderedDict()

    def __bool__(self) -> bool:
        """Whether any path is pinned (nothing to do for the others)."""
        return bool(self._pins)

    def streaming(self) -> int:
        """How many of the readers have a run fetching ahead now."""
        with self._lock:
            return sum(1 for r in self._readers.values() if r.streaming)

    def reader(self, path: str, lookup: Callable[[], Entry], depth: Callable[[], int]) -> FileReader:
        """The reader of the version `path` is pinned to; an unpinned path
        is pinned to `lookup()`. ESTALE while its pages are being dropped."""
        with self._lock:
            reader = self._readers.get(path)
            if reader is not None:
                self._readers.move_to_end(path)
                return reader
            pinned: Entry | None | Literal[False] = self._pins.get(path, False)
        if pinned is None:
            raise FsError(errno.ESTALE)  # its version is gone and the kernel is still dropping its pages
        if pinned is False:
            pinned = lookup()
            if pinned.is_dir:
                raise FsError(errno.EISDIR)
        ahead = depth()
        with self._lock:
            reader = self._readers.get(path)
            if reader is not None:  # another thread got there first
                return reader
            pinned = self._pins.setdefault(path, pinned)
            if pinned is None:
                raise FsError(errno.ESTALE)
            reader = self._readers[path] = self._reads.open(pinned, ahead)
            evicted = self._readers.popitem(last=False)[1] if len(self._readers) > PATH_READERS else None
        if evicted is not None:
            evicted.close()  # its reader is long gone
        return reader

    def settle(self, path: str) -> None:
        """Wait (SETTLE_TIMEOUT at most) until the kernel has dropped the
        pages of a version of `path` found gone: the old version's pages go
        before the new one's attributes are told."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while (settling := self._settling.get(path)) is not None and time.monotonic() < deadline:
            settling.wait(deadline - time.monotonic())

    def told(self, path: str, entry: Entry | None, settled: bool = False) -> None:
        """The kernel is being told `entry` (None: no such file) for a path:
        reads without a handle move to that version, and the kernel drops
        the old one's pages (it does so itself only where the size or the
        modification time changed). A path whose version was found gone
        moves on only once the kernel has dropped its pages (`settled`: the
        caller waited for that) and asks for its attributes: a read call
        that met the error gets no byte of another version after it."""
        with self._lock:
            if path not in self._pins:
                return
            pinned = self._pins[path]
            if pinned is None:
                if not settled or path in self._settling:
                    return
            elif entry is not None and entry.etag == pinned.etag:
                return
            if entry is None:
                del self._pins[path]
            else:
                self._pins[path] = entry
            reader = self._readers.pop(path, None)
        if reader is not None:
            reader.close()
        if pinned is not None and self.kernel is not None:
            self.kernel.forget_data(path, lambda: None)

    def version_gone(self, path: str, gone: Entry) -> None:
        """A read without a handle found its pinned version gone: no byte of
        another is served for the path until the kernel has dropped every
        page of the old one and asked for the new attributes."""
        settled = threading.Event()
        with self._lock:
            pinned: Entry | None | Literal[False] = self._pins.get(path, False)
            if pinned is None or (pinned is not False and pinned.etag != gone.etag):
                return  # another read found it first, or the path has moved on to a newer version
            self._pins[path] = None
            self._settling[path] = settled
            reader = self._readers.pop(path, None)
        if reader is not None:
            reader.close()

        def done():  # the pin stays None until the kernel asks for the attributes (getattr)
            with self._lock:
                if self._settling.get(path) is settled:
                    del self._settling[path]
            settled.set()
        if self.kernel is None:
            done()
            return
        try:
            # the next stat, or the next read call, asks mountd (getattr),
            # which waits until the old pages are gone
            self.kernel.forget_attributes(path)
        except OSError as e:
            log.warning("could not have the kernel ask for the attributes of %s again: %s", path, e)
        self.kernel.forget_data(path, done)
