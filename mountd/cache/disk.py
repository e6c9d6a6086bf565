"""The block cache's disk tier: blocks as files under the cache directory,
capped in bytes and kept off a reserved amount of free disk, and the thread
that writes them there off the read path.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import logging
import os
import queue
import threading
import time
from collections import OrderedDict

from mountd.cache.buffers import Block, BufferPool
from mountd.fileio import NewFile, align_up

log = logging.getLogger(__name__)

BlockKey = tuple  # (path, etag, index)
WRITE_SIZE = 1024 * 1024  # bytes per write of a block to the disk tier
# How long the disk's free space, as statvfs gave it, is taken as it is
# (less what this tier wrote since, plus what it removed). Asked twice for
# every block stored, statvfs was a system call per lookup of the room a
# dataset prefetch has; other writers to the disk are seen within this time.
FREE_SPACE_TTL = 0.5


def _read_file(path: str, view: memoryview, size: int) -> int:
    """Read a cache file of `size` bytes into `view`; the bytes read. Around
    the page cache when the buffer is aligned for it (a pooled one)."""
    if len(view) >= align_up(size):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
        except OSError:
            pass
        else:
            try:
                return min(_read_all(fd, view[:align_up(size)]), size)
            except OSError as e:
                if e.errno != errno.EINVAL:
                    raise  # EINVAL: direct I/O refused after all; read it the ordinary way
            finally:
                os.close(fd)
    fd = os.open(path, os.O_RDONLY)
    try:
        return _read_all(fd, view[:size])
    finally:
        os.close(fd)


def _read_all(fd: int, view: memoryview, offset: int = 0) -> int:
    got = 0
    while got < len(view) and (n := os.preadv(fd, [view[got:]], offset + got)):
        got += n
    return got


class DiskTier:
    """Blocks as files under `directory`, evicted least recently used first."""

    def __init__(self, directory: str, max_bytes: int, reserved_free: int):
        self.directory = directory
        self.max_bytes = max_bytes
        self.reserved_free = reserved_free
        self._lock = threading.Lock()
        self._files: OrderedDict[str, int] = OrderedDict()  # name -> size, oldest first
        # Blocks the dataset prefetch stored and no read has used yet: never
        # evicted, so the job's own reads cannot push out what was fetched
        # for them before they get to it (that was fetching the data twice
        # on a dataset larger than the cache). Read once, a block joins the LRU.
        self._held: dict[str, int] = {}
        self.used = 0
        self._writing = 0  # bytes of blocks being written, which the disk's free space does not show yet
        self._free_at = -FREE_SPACE_TTL  # when statvfs was last asked (see _free_disk)
        self._free_seen = 0  # what it said
        self._free_change = 0  # bytes this tier wrote (-) and removed (+) since
        # the 256 fan-out directories known to exist: a makedirs per block cost
        # a failing mkdir system call each (about 1 000 per 1 000 blocks stored)
        self._made: set[str] = set()
        os.makedirs(directory, mode=0o700, exist_ok=True)
        self._adopt_existing()

    def _adopt_existing(self) -> None:
        """Index what an earlier mount of the same store left, oldest first."""
        found = []
        for sub in os.scandir(self.directory):
            if not sub.is_dir(follow_symlinks=False):
                continue
            for f in os.scandir(sub.path):
                if f.name.endswith((".tmp", ".partial")):  # a write cut short
                    os.unlink(f.path)
                    continue
                st = f.stat()
                found.append((st.st_atime, f"{sub.name}/{f.name}", st.st_size))
        for _, name, size in sorted(found):
            self._files[name] = size
            self.used += size
        self._evict(0)

    @staticmethod
    @functools.lru_cache(maxsize=8192)  # asked 3-4 times per block stored and read: a hash of its repr each time
    def _name(key: BlockKey) -> str:
        digest = hashlib.sha256(repr(key).encode("utf-8", "surrogateescape")).hexdigest()
        return f"{digest[:2]}/{digest[2:40]}"

    def contains(self, key: BlockKey) -> bool:
        with self._lock:
            name = self._name(key)
            return name in self._files or name in self._held

    def _touch(self, name: str) -> int | None:
        """The size of a block this tier has, now the most recently used
        (lock held); None if it has not."""
        size = self._held.pop(name, None)
        if size is not None:
            self._files[name] = size
            return size
        size = self._files.get(name)
        if size is not None:
            self._files.move_to_end(name)
        return size

    def get(self, key: BlockKey, buffers: BufferPool | None = None) -> Block | None:
        """The block if this tier has it, read into a buffer of `buffers`."""
        name = self._name(key)
        with self._lock:
            size = self._touch(name)
            if size is None:
                return None
        path = os.path.join(self.directory, name)
        buffer = buffers.buffer(size) if buffers else bytearray(size)
        try:
            got = _read_file(path, memoryview(buffer), size)
        except OSError:
            got = -1
        if got != size:  # gone or cut short under us: forget it
            with self._lock:
                if self._files.get(name) == size:
                    self.used -= self._files.pop(name)
            return None
        return buffers.block(buffer, size) if buffers else Block(buffer, size)

    def read_range(self, key: BlockKey, start: int, dest: memoryview) -> int | None:
        """Part of a block straight from its file (the bytes read into
        `dest`), or None if this tier does not have it. For scattered small
        reads: loading a whole block to serve a few pages costs a block's
        worth of disk reads each time."""
        name = self._name(key)
        with self._lock:
            size = self._touch(name)
            if size is None:
                return None
        try:
            fd = os.open(os.path.join(self.directory, name), os.O_RDONLY)
        except OSError:
            return None
        try:
            return _read_all(fd, dest[:max(0, size - start)], start)
        except OSError:
            return None
        finally:
            os.close(fd)

    def put(self, key: BlockKey, data, prefetched: bool = False) -> bool:
        """Store a block (a Block or bytes) unless it is here already or
        there is no room for it within the cap and the reserve; whether the
        tier holds it now. A `prefetched` block goes only into free room
        (a dataset prefetch must not push out what it stored a moment
        before) and is held until read."""
        view = data.view if isinstance(data, Block) else memoryview(data)
        name = self._name(key)
        size = len(view)
        if size > self.max_bytes:
            return False
        with self._lock:
            if name in self._files or name in self._held:
                return True
            if not (self._room(size, self._free_disk()) if prefetched else self._evict(size)):
                return False  # no room without breaking the cap or the reserve: do not cache
            (self._held if prefetched else self._files)[name] = size  # reserve the space before writing
            self.used += size
            self._writing += align_up(size)  # not on the disk yet: statvfs does not count it
        path = os.path.join(self.directory, name)
        new = None
        directory = os.path.dirname(path)
        try:
            if directory not in self._made:
                os.makedirs(directory, mode=0o700, exist_ok=True)
                self._made.add(directory)
            # around the page cache: the kernel already caches what the mount
            # served, and a second copy of it would only push other pages out
            try:
                new = NewFile(path, direct=True, mode=0o600)
            except FileNotFoundError:  # its directory was removed from under us: make it again
                os.makedirs(directory, mode=0o700, exist_ok=True)
                new = NewFile(path, direct=True, mode=0o600)
            for start in range(0, size, WRITE_SIZE):  # large single writes cost the kernel far more
                new.pwrite(view[start:start + WRITE_SIZE], start)
            new.finish()
        except OSError as e:
            if new is not None:
                new.discard()
            with self._lock:
                self._writing -= align_up(size)
                self.used -= self._files.pop(name, 0) or self._held.pop(name, 0)
            if e.errno == errno.ENOSPC:  # the disk filled under us: shed some cache
                with self._lock:
                    self._evict(self.used // 4 or size)
            else:
                log.warning("disk cache: cannot write a block: %s", e.strerror)
            return False
        with self._lock:
            self._writing -= align_up(size)
            self._free_change -= align_up(size)  # on the disk now, which a fresh statvfs would show
        return True

    def has_room(self, size: int) -> bool:
        """Whether `size` more bytes fit within the cap and the reserve
        without evicting anything."""
        with self._lock:
            return self._room(size, self._free_disk())

    def _room(self, incoming: int, free: int) -> bool:
        """Lock held. Blocks are written by several threads at once (the
        dataset prefetch), so the free space counts what they are writing."""
        return (self.used + incoming <= self.max_bytes
                and free - self._writing - align_up(incoming) >= self.reserved_free)

    def _free_disk(self) -> int:
        """The disk's free space (lock held): statvfs at most every
        FREE_SPACE_TTL, adjusted for this tier's own writes and removals since."""
        now = time.monotonic()
        if now - self._free_at >= FREE_SPACE_TTL:
            st = os.statvfs(self.directory)
            self._free_at, self._free_seen, self._free_change = now, st.f_bavail * st.f_frsize, 0
        return self._free_seen + self._free_change

    def _evict(self, incoming: int) -> bool:
        """Make room for `incoming` bytes (lock held). False if impossible."""
        free = self._free_disk()
        while self._files and not self._room(incoming, free):
            name, size = self._files.popitem(last=False)
            try:
                os.unlink(os.path.join(self.directory, name))
                free += size
                self._free_change += size
            except FileNotFoundError:
                pass
            self.used -= size
        return self._room(incoming, free)

    def clear(self) -> None:
        with self._lock:
            self._files.update(self._held)
            self._held.clear()
            while self._files:
                name, _ = self._files.popitem()
                try:
                    os.unlink(os.path.join(self.directory, name))
                except FileNotFoundError:
                    pass
            self.used = 0


class DiskWriter:
    """Writes blocks to the disk tier off the read path. When the disk falls
    behind, blocks are dropped rather than queued: the reader already has
    them, and a slow disk must not slow reads from storage."""

    def __init__(self, disk: DiskTier, depth: int):
        self.disk = disk
        self.dropped = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue(depth)
        self._thread = threading.Thread(target=self._run, name="disk-cache-writer", daemon=True)
        self._thread.start()

    def submit(self, key: BlockKey, data: Block, must: bool = False) -> None:
        """Write a block; takes over the lease `data`. When the writer is
        behind, the block is dropped, or with `must` written here and now."""
        try:
            self._queue.put_nowait((key, data))
            return
        except queue.Full:
            pass
        if must:
            self._write(key, data)
            return
        data.release()
        with self._lock:  # submitted from every reader's thread
            self.dropped += 1

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            self._write(*item)

    def _write(self, key: BlockKey, data: Block) -> None:
        try:
            self.disk.put(key, data)
        except Exception:  # noqa: BLE001 - the cache is an optimisation; never kill the writer
            log.exception("disk cache write failed")
        finally:
            data.release()

    def close(self) -> None:
        try:
            self._queue.put_nowait(None)
        except queue.Full:
            pass
