"""Filesystem core: getattr, readdir, open, read, release and statfs over an
ObjectStore through the metadata and block caches. No FUSE here: the glue in
`fuse_ops` translates calls, and tests drive this class directly.

Paths arrive as FUSE gives them ("/a/b"); the store sees them under the
mount's prefix ("prefix/a/b").
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import stat
import threading
import time
from dataclasses import dataclass

from mountd.cache.blocks import BlockCache
from mountd.cache.meta import MetadataCache
from mountd.cache.prefetch import ReadAhead
from mountd.config.settings import CacheSettings
from mountd.errors import MountdError, NotFound, Stale
from mountd.storage.base import Entry, ObjectStore, join

log = logging.getLogger(__name__)


class FsError(OSError):
    """An errno for the caller (FUSE passes it to the application)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(code, message or os.strerror(code))


@dataclass
class OpenFile:
    entry: Entry
    readahead: ReadAhead


class FileSystemCore:
    def __init__(self, store: ObjectStore, settings: CacheSettings, blocks: BlockCache,
                 prefix: str = "", read_only: bool = True, uid: int | None = None, gid: int | None = None):
        self.store = store
        self.settings = settings
        self.prefix = prefix.strip("/")
        self.read_only = read_only
        self.meta = MetadataCache(store, settings.attribute_ttl, settings.negative_ttl)
        self.blocks = blocks
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._handles: dict[int, OpenFile] = {}
        self._next_fh = itertools.count(1)
        self._lock = threading.Lock()
        self._opened_etags: dict[str, str] = {}  # path -> etag at last open, for keep_cache
        self.started = time.time()
        self.bytes_served = 0
        self.read_errors = 0

    # -- paths and attributes --------------------------------------------------------
    def _store_path(self, path: str) -> str:
        return join(self.prefix, path.strip("/"))

    def _entry(self, path: str) -> Entry:
        try:
            return self.meta.stat(self._store_path(path))
        except NotFound:
            raise FsError(errno.ENOENT) from None
        except MountdError as e:
            log.error("stat %s: %s", path, e)
            raise FsError(errno.EIO) from None

    def attributes(self, entry: Entry) -> dict:
        mode_bits = 0o555 if self.read_only else 0o755
        if entry.is_dir:
            mode, nlink, size = stat.S_IFDIR | mode_bits, 2, 4096
        else:
            mode, nlink, size = stat.S_IFREG | (mode_bits & 0o666 if self.read_only else 0o644), 1, entry.size
        mtime_ns = int((entry.mtime or self.started) * 1e9)
        return {"st_mode": mode, "st_nlink": nlink, "st_size": size, "st_uid": self.uid, "st_gid": self.gid,
                "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns,
                "st_blocks": (size + 511) // 512, "st_blksize": self.settings.block_size}

    def getattr(self, path: str) -> dict:
        return self.attributes(self._entry(path))

    def readdir(self, path: str):
        """(name, attributes) for each child, streamed as storage lists them."""
        entry = self._entry(path)
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR)
        try:
            for child in self.meta.list_dir(self._store_path(path)):
                yield child.name, self.attributes(child)
        except NotFound:
            raise FsError(errno.ENOENT) from None
        except MountdError as e:
            log.error("list %s: %s", path, e)
            raise FsError(errno.EIO) from None

    # -- files ------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> tuple[int, bool]:
        """(handle, keep_cache). keep_cache tells the kernel its cached pages
        of this file are still good: true when the object has not changed
        since it was last opened."""
        if self.read_only and flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        entry = self._entry(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR)
        readahead = ReadAhead(self.settings.block_size, self._readahead_blocks(), entry.size)
        with self._lock:
            fh = next(self._next_fh)
            self._handles[fh] = OpenFile(entry, readahead)
            keep = self._opened_etags.get(entry.path) == entry.etag
            self._opened_etags[entry.path] = entry.etag
        return fh, keep

    def _readahead_blocks(self) -> int:
        # the block cache knows how many prefetched blocks its memory can hold
        return min(self.settings.readahead_blocks, self.blocks.readahead_limit)

    def read(self, fh: int, size: int, offset: int) -> bytes:
        handle = self._handles.get(fh)
        if handle is None:
            raise FsError(errno.EBADF)
        entry = handle.entry
        if offset >= entry.size or size <= 0:
            return b""
        size = min(size, entry.size - offset)
        bs = self.settings.block_size
        first, last = offset // bs, (offset + size - 1) // bs
        try:
            pieces = [self._block(entry, i) for i in range(first, last + 1)]
        except Stale:
            self.read_errors += 1
            self.meta.forget(entry.path)  # so that reopening it finds the new version at once
            log.error("%s changed in storage while open (etag %s); reopen it to read the new version",
                      entry.path, entry.etag)
            raise FsError(errno.ESTALE) from None
        except NotFound:
            self.read_errors += 1
            self.meta.forget(entry.path)
            log.error("%s was deleted from storage while open", entry.path)
            raise FsError(errno.ESTALE) from None
        except MountdError as e:
            self.read_errors += 1
            log.error("read %s at %d: %s", entry.path, offset, e)
            raise FsError(errno.EIO) from None
        wanted = handle.readahead.on_read(offset, size)
        if wanted:
            self.blocks.prefetch_run([self._key(entry, i) for i in wanted], self._streamer(entry, wanted),
                                     lambda i: self._fetcher(entry, wanted[i]))
        start = offset - first * bs
        if len(pieces) == 1:
            data = bytes(memoryview(pieces[0])[start:start + size])
        else:
            data = b"".join(pieces)[start:start + size]
        self.bytes_served += len(data)
        return data

    def _key(self, entry: Entry, index: int) -> tuple:
        return (entry.path, entry.etag, index)

    def _fetcher(self, entry: Entry, index: int):
        bs = self.settings.block_size
        offset = index * bs
        length = min(bs, entry.size - offset)

        def fetch() -> bytes:
            data = self.store.read(entry.path, offset, length, entry.etag)
            if len(data) != length:  # the object shrank without its etag changing: never serve a mix
                raise Stale(f"{entry.path}: expected {length} bytes at {offset}, storage gave {len(data)}")
            return data
        return fetch

    def _streamer(self, entry: Entry, indices: range):
        """Fetch `count` consecutive blocks from indices[first] on with one
        long ranged read: storage answers one long request faster than many
        block-sized ones."""
        bs = self.settings.block_size

        def stream(first: int, count: int, deliver) -> None:
            start = indices[first] * bs
            length = min(count * bs, entry.size - start)
            buf = memoryview(bytearray(bs))

            def sink(offset: int, piece: memoryview) -> None:
                deliver(first + (offset - start) // bs, bytes(piece))
            got = self.store.read_stream(entry.path, start, length, entry.etag, buf, sink)
            if got != length:
                raise Stale(f"{entry.path}: expected {length} bytes at {start}, storage gave {got}")
        return stream

    def _block(self, entry: Entry, index: int) -> bytes:
        return self.blocks.get(self._key(entry, index), self._fetcher(entry, index))

    def release(self, fh: int) -> None:
        with self._lock:
            self._handles.pop(fh, None)

    def open_handles(self) -> int:
        return len(self._handles)

    def statfs(self) -> dict:
        # Object storage has no fixed size; report a large, honest-looking
        # capacity so tools that check free space before writing do not refuse.
        block = 4096
        total = 1 << 50
        return {"f_bsize": block, "f_frsize": block, "f_blocks": total // block, "f_bfree": total // block,
                "f_bavail": total // block, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_namemax": 1024}

    def close(self) -> None:
        self.blocks.close()
        self.store.close()
