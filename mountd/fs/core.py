"""Filesystem core: the POSIX operations of a mount over an ObjectStore, one
method each, reads through the caches and writes through staged copies.

No FUSE here: the glue in `fuse_ops` translates calls, and tests drive
this class directly.

Paths arrive as FUSE gives them ("/a/b"); the store sees them under the
mount's prefix ("prefix/a/b").

Files open when their name goes (unlink, or a rename replacing them) keep
their bytes, as POSIX has it: a handle writing the file has them in its
staged copy already, which is then never uploaded; a handle reading it gets
a copy (`handles`). Until the last handle closes, the file can go by a name
of the mount's own (`unlink`'s `keep_as`), for calls that need a path
(fstat, ftruncate).

The machinery is elsewhere: reading a file (`reader`), reads without a
handle when the kernel opens files itself (`pins`), open handles
(`handles`), attributes (`attributes`), staged copies (`writeback`).
What is left is one method per POSIX operation with the checks it makes:
longer than the house's 450 lines, because splitting the operations up
would hide the one place that says what each call does.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from contextlib import contextmanager

from cachetools import LRUCache

from mountd.cache.blocks import BlockCache
from mountd.cache.meta import MetadataCache
from mountd.cache.prefetch import blocks_kept_behind
from mountd.config.settings import CacheSettings
from mountd.errors import MountdError, NotFound, Stale
from mountd.fs.attributes import Attributes, statfs
from mountd.fs.errors import FsError, errno_for
from mountd.fs.handles import Handles, OpenFile
from mountd.fs.listing import DirListing
from mountd.fs.pins import KernelCache, PinnedPaths
from mountd.fs.reader import FileReader, Reads
from mountd.fs.writeback import StagedFile, WriteBack
from mountd.paths import is_within, join
from mountd.storage.base import Entry, ObjectStore

log = logging.getLogger(__name__)


WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND
# Files whose etag at their last open is kept, to tell the kernel it may keep
# their pages (keep_cache): about 20 MiB at this count.
OPENED_ETAGS_KEPT = 100_000


class FileSystemCore:
    def __init__(self, store: ObjectStore, settings: CacheSettings, blocks: BlockCache,
                 prefix: str = "", read_only: bool = True, uid: int | None = None, gid: int | None = None,
                 writeback: WriteBack | None = None):
        if not read_only and writeback is None:
            raise ValueError("a read-write mount needs a WriteBack")
        self.store = store
        self.writeback = writeback
        self.settings = settings
        self.prefix = prefix.strip("/")
        self.read_only = read_only
        self.meta = MetadataCache(store, settings.attribute_ttl, settings.negative_ttl)
        self.blocks = blocks
        self.reads = Reads(store, blocks, settings.block_size)
        self.attrs = Attributes(read_only, os.getuid() if uid is None else uid, os.getgid() if gid is None else gid,
                                settings.block_size)
        self._handles = Handles()
        self._lock = threading.Lock()
        # path -> etag at its last open, for keep_cache; the least recently
        # opened are forgotten (their next open drops the kernel's pages:
        # slower, never wrong), so a job opening millions of files does not
        # grow this outside every cache's cap
        self._opened_etags: LRUCache = LRUCache(maxsize=OPENED_ETAGS_KEPT)
        self._kept: dict[str, bool] = {}  # names unlink(keep_as=) gave files still open (store paths)
        # kernel opens: set by the glue when the kernel may open files itself
        self.kernel_opens = False
        self._pins = PinnedPaths(self.reads)
        # asked once: a local store's answer costs a statvfs
        self.name_limits = store.name_limits()
        self.bytes_served = 0
        self.read_errors = 0
        # requests that reached the core, by operation: what a later epoch
        # still costs in round trips once its bytes are in the page cache
        self.calls = dict.fromkeys(("getattr", "open", "read", "flush", "release"), 0)
        # FUSE calls these from many threads at once: `+=` is a read, an add
        # and a store, and two threads between them lose one's count
        self._counting = threading.Lock()

    def _count(self, what: str, served: int = 0) -> None:
        """Count a call (`calls`) or a read error, and bytes served."""
        with self._counting:
            if what == "read_errors":
                self.read_errors += 1
            else:
                self.calls[what] += 1
            self.bytes_served += served

    # -- paths and attributes --------------------------------------------------------
    def _store_path(self, path: str) -> str:
        """The store's path for a mount path. Every call naming a path comes
        through here, so a name the store could never hold is refused at
        once (ENAMETOOLONG) instead of failing its upload at close."""
        store_path = join(self.prefix, path.strip("/"))
        if self.name_limits.too_long(store_path):
            raise FsError(errno.ENAMETOOLONG)
        return store_path

    def _entry(self, path: str) -> Entry:
        with errno_for(f"stat {path}"):
            return self.meta.stat(self._store_path(path))

    def getattr(self, path: str) -> dict:
        self._count("getattr")
        with self._borrowed(self._store_path(path)) as sf:
            if sf is not None:
                return self.attrs.of_staged(sf)
        if not self._pins:
            return self.attrs.of(self._entry(path))
        self._pins.settle(path)
        try:
            entry = self._entry(path)
        except FsError as e:
            if e.errno == errno.ENOENT:
                self._pins.told(path, None, settled=True)
            raise
        self._pins.told(path, entry, settled=True)
        return self.attrs.of(entry)

    @contextmanager
    def _borrowed(self, store_path: str):
        """The staged copy of `store_path` (or None), usable until the block
        ends whatever its handles do meanwhile. Never yield to a caller
        inside the block: it would keep the copy for as long as it likes."""
        if self.writeback is None:
            yield None
            return
        with self.writeback.borrow(store_path) as sf:
            yield sf

    def readdir(self, path: str):
        """(name, attributes) for each child, streamed as storage lists them."""
        entry = self._entry(path)
        if not entry.is_dir:
            raise FsError(errno.ENOTDIR)
        store_path = self._store_path(path)
        # Attributes are taken as each entry is handed out, not when the
        # listing started: the kernel takes a listing's sizes as the files'
        # (readdirplus), and a size from before the last write would cut
        # the file short in its cache.
        staged = {sf.path.rpartition("/")[2]: sf.path for sf in self.writeback.staged_under(store_path)} \
            if self.writeback else {}
        with errno_for(f"list {path}"):
            for child in self.meta.list_dir(store_path):
                staged.pop(child.name, None)
                if self._pins and not child.is_dir:
                    self._pins.told(path.rstrip("/") + "/" + child.name, child)  # readdirplus tells the kernel
                yield child.name, self._child_attributes(child.path, child)
            for name, child_path in staged.items():  # created here, not in storage when listed
                attrs = self._child_attributes(child_path, None)
                if attrs is not None:
                    yield name, attrs

    def _child_attributes(self, store_path: str, listed: Entry | None) -> dict | None:
        """A listed file's attributes: its staged copy's if it has one, else
        what storage listed, else (closed since the listing began) what is
        known of it now; None if it is gone."""
        with self._borrowed(store_path) as sf:
            if sf is not None:
                return self.attrs.of_staged(sf)
        if listed is not None:
            return self.attrs.of(listed)
        try:
            return self.attrs.of(self.meta.stat(store_path))
        except NotFound:
            return None

    def opendir(self, path: str) -> int:
        """A handle for reading the directory at `path` a buffer at a time
        (`readdir_at`): its entries are "." and "..", then the children."""
        if not self._entry(path).is_dir:
            raise FsError(errno.ENOTDIR)

        def entries():
            yield ".", None
            yield "..", None
            yield from self.readdir(path)
        return self._handles.add_dir(DirListing(entries))

    def readdir_at(self, dh: int, offset: int):
        """(offset, (name, attributes or None)) for the entries of an open
        directory after `offset`."""
        return self._handles.dir(dh).after(offset)

    def releasedir(self, dh: int) -> None:
        self._handles.pop_dir(dh)

    # -- files ------------------------------------------------------------------------
    def open(self, path: str, flags: int) -> tuple[int, bool]:
        """(handle, keep_cache). keep_cache tells the kernel its cached pages
        of this file are still good: true when the object has not changed
        since it was last opened."""
        self._count("open")
        if flags & WRITE_FLAGS:
            if self.read_only:
                raise FsError(errno.EROFS)
            return self._open_staged(path, flags, create=False), False
        if self.kernel_opens:
            raise FsError(errno.ENOSYS)  # the kernel opens files itself from now on
        if self.writeback and self.writeback.get(self._store_path(path)):
            return self._open_staged(path, flags, create=False), False
        entry = self._entry(path)
        if entry.is_dir:
            raise FsError(errno.EISDIR)
        fh = self._handles.add(OpenFile(entry, self.reads.open(entry, self._readahead_blocks())))
        with self._lock:
            keep = self._opened_etags.get(entry.path) == entry.etag
            self._opened_etags[entry.path] = entry.etag
        return fh, keep

    def create(self, path: str, flags: int) -> int:
        """A new file; it reaches storage when closed. If storage has the
        name after all (the kernel's view was stale), O_EXCL fails and
        otherwise the file is opened as it is."""
        if self.read_only:
            raise FsError(errno.EROFS)
        return self._open_staged(path, flags, create=True)

    def _open_staged(self, path: str, flags: int, create: bool) -> int:
        store_path = self._store_path(path)
        assert self.writeback is not None  # callers checked the mount is read-write
        found = []

        def lookup() -> Entry | None:
            """What storage holds at `path`; asked only when nothing is staged there."""
            try:
                entry = self.meta.stat(store_path)
            except NotFound:
                if not create:
                    raise
                self._parent_dir(path)
                self.attrs.changed_dir_of(store_path)
                return None
            if entry.is_dir:
                raise FsError(errno.EISDIR)
            if create and flags & os.O_EXCL:
                raise FsError(errno.EEXIST)
            found.append(entry)
            return entry
        with errno_for(f"open {path}"):
            sf = self.writeback.open(store_path, lookup, truncate=bool(flags & os.O_TRUNC))
        if create:
            self.meta.forget(store_path)  # it may be cached as absent
        return self._handles.add(OpenFile(found[0] if found else None, None, sf, append=bool(flags & os.O_APPEND),
                                          writable=create or bool(flags & WRITE_FLAGS)))

    def _parent_dir(self, path: str) -> None:
        parent = os.path.dirname(path.rstrip("/")) or "/"
        if not self._entry(parent).is_dir:
            raise FsError(errno.ENOTDIR)

    def _readahead_blocks(self) -> int:
        """How deep a file opened now may read ahead. Each sequential reader
        keeps in the block cache's memory its blocks ahead and those it left
        less than SLACK behind; the memory is shared among the files open
        now, so that no reader's blocks are evicted before it gets to them.
        Deeper means longer requests: each costs the storage far more than
        its bytes (measured on Azurite: 20 ms of CPU with 20 000 blobs in the
        container)."""
        readers = 1 + self._handles.readers() + self._pins.streaming()
        share = self.blocks.lru_blocks // readers - blocks_kept_behind(self.settings.block_size)
        return max(1, min(self.settings.readahead_blocks, share))

    def let_kernel_open(self, kernel: KernelCache) -> bool:
        """Called by the glue when the kernel can open files itself: whether
        it should (read-only, page cache in use, strict_open off)."""
        if not self.read_only or self.settings.direct_io or self.settings.strict_open:
            return False
        self._pins.kernel, self.kernel_opens = kernel, True
        return True

    def read(self, fh: int, size: int, offset: int) -> bytes:
        """Up to `size` bytes at `offset` (fewer only at the end of the file)."""
        buf = bytearray(size)
        n = self.read_into(fh, memoryview(buf), offset)
        return bytes(buf) if n == size else bytes(buf[:n])

    def read_into(self, fh: int, dest: memoryview, offset: int) -> int:
        """Fill `dest` from `offset`; the bytes placed (fewer only at the end
        of the file). Copies straight from the cached blocks, so a FUSE read
        costs one copy into the kernel's buffer."""
        n = 0
        try:
            handle = self._handles[fh]
            if handle.staged is not None:
                with errno_for(f"read {handle.staged.path}"):
                    n = self._wb.read_into(handle.staged, dest, offset)
            else:
                assert handle.reader is not None  # not staged: it reads a version storage holds
                n = self._read_stored(handle.reader, dest, offset)
            return n
        finally:
            self._count("read", served=n)

    def read_path_into(self, path: str, dest: memoryview, offset: int) -> int:
        """read_into for a file the kernel opened itself: from the version
        `path` is pinned to."""
        n = 0
        try:
            reader = self._pins.reader(path, lambda: self._entry(path), self._readahead_blocks)
            n = self._read_stored(reader, dest, offset, path)
            return n
        finally:
            self._count("read", served=n)

    def _read_stored(self, reader: FileReader, dest: memoryview, offset: int, path: str | None = None) -> int:
        """A read of the version in storage; a version found changed or gone
        fails it with ESTALE (and a read without a handle moves its path on)."""
        entry = reader.entry
        try:
            return reader.read_into(dest, offset)
        except (Stale, NotFound) as e:
            self._count("read_errors")
            self.meta.forget(entry.path)  # so that reopening it finds the new version at once
            if path is not None:
                self._pins.version_gone(path, entry)
            if isinstance(e, Stale):
                log.error("%s changed in storage while open (etag %s); reopen it to read the new version",
                          entry.path, entry.etag)
            else:
                log.error("%s was deleted from storage while open", entry.path)
            raise FsError(errno.ESTALE) from None
        except MountdError as e:
            self._count("read_errors")
            log.error("read %s at %d: %s", entry.path, offset, e)
            raise FsError(errno.EIO) from None

    def block_fetch(self, entry: Entry, index: int) -> tuple:
        """(key, length, fetch) of block `index` of `entry`: the dataset
        prefetch fills the cache with the blocks reads look up."""
        return self.reads.block_fetch(entry, index)

    def write(self, fh: int, data: bytes, offset: int) -> int:
        handle = self._handles[fh]
        if handle.staged is None:
            raise FsError(errno.EBADF)
        assert self.writeback is not None  # only a read-write mount stages files
        with errno_for(f"write {handle.staged.path}"):
            return self.writeback.write(handle.staged, data, offset, append=handle.append)

    def flush(self, fh: int) -> None:
        """close() and fsync(): a changed file goes to storage now; its errors
        (EIO) reach the application here."""
        self._count("flush")
        if self.read_only:
            raise FsError(errno.ENOSYS)  # nothing to do, ever: the kernel stops asking
        handle = self._handles[fh]
        if handle.staged is not None and handle.writable:
            self._upload(handle.staged)

    def _upload(self, sf: StagedFile) -> None:
        assert self.writeback is not None  # only a read-write mount stages files
        entry = self.writeback.flush(sf)  # raises FsError(EIO)
        if entry is not None:
            self.meta.remember(entry)

    def release(self, fh: int) -> None:
        self._count("release")
        handle = self._handles.pop(fh)
        if handle is None:
            return
        with handle.lock:  # against keep_open_readers giving it a copy now
            handle.released = True
            staged = handle.staged
        if handle.reader is not None:
            handle.reader.close()
        if staged is not None:
            assert self.writeback is not None  # only a read-write mount stages files
            self.writeback.release(staged)

    # -- namespace changes (read-write mounts) -------------------------------------------------
    def _writable(self) -> None:
        if self.read_only:
            raise FsError(errno.EROFS)

    @property
    def _wb(self) -> WriteBack:
        """The write-back of a read-write mount (its callers have checked
        `_writable` or hold a staged copy, which only such a mount makes)."""
        assert self.writeback is not None
        return self.writeback

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        self._writable()
        sf = self._handles[fh].staged if fh is not None else None
        if sf is not None:  # the handle holds its copy
            with errno_for(f"truncate {path}"):
                self._wb.truncate(sf, length)
            return
        with self._borrowed(self._store_path(path)) as sf:
            if sf is not None:
                with errno_for(f"truncate {path}"):
                    self._wb.truncate(sf, length)
                return
        # not open here: open, truncate, close, as `truncate -s` does
        handle = self._open_staged(path, os.O_WRONLY | (os.O_TRUNC if length == 0 else 0), create=False)
        try:
            sf = self._handles[handle].staged
            assert sf is not None  # _open_staged stages the file
            with errno_for(f"truncate {path}"):
                self._wb.truncate(sf, length)
            self.flush(handle)
        finally:
            self.release(handle)

    def unlink(self, path: str, keep_as: str | None = None) -> None:
        """Delete a file. Its open handles keep its bytes; `keep_as`, a name
        no one else uses, reaches them meanwhile (stat, truncate) until it is
        unlinked in turn, which touches nothing in storage."""
        self._writable()
        assert self.writeback is not None  # read-write: the constructor requires one
        store_path = self._store_path(path)
        with self._lock:
            kept = self._kept.pop(store_path, None)
        if kept is not None:  # storage lost the file when it took this name
            self.writeback.unlink(store_path)
            return
        with errno_for(f"delete {path}"):
            entry = None if self.writeback.get(store_path) else self._entry(path)
            if entry is not None and entry.is_dir:
                raise FsError(errno.EISDIR)
            self._handles.keep_open_readers(self.writeback, store_path)
            keep = self._store_path(keep_as) if keep_as is not None else None
            if keep is not None:
                with self._lock:
                    self._kept[keep] = True
            local_only = self.writeback.unlink(store_path, keep_as=keep)
            if not local_only:
                try:
                    self.store.delete(store_path)
                except NotFound:
                    if entry is not None:
                        raise
        self.meta.forget(store_path)
        self.attrs.changed_dir_of(store_path)

    def mkdir(self, path: str) -> None:
        self._writable()
        store_path = self._store_path(path)
        with errno_for(f"mkdir {path}"):
            if self._exists(path):
                raise FsError(errno.EEXIST)
            self._parent_dir(path)
            self.store.mkdir(store_path)
        self.meta.forget(store_path)
        self.attrs.changed_dir_of(store_path)
        self.meta.forget(store_path.rpartition("/")[0])  # its link count changed

    def _exists(self, path: str) -> bool:
        assert self.writeback is not None  # read-write: the constructor requires one
        if self.writeback.get(self._store_path(path)):
            return True
        try:
            self._entry(path)
            return True
        except FsError as e:
            if e.errno == errno.ENOENT:
                return False
            raise

    def rmdir(self, path: str) -> None:
        self._writable()
        assert self.writeback is not None  # read-write: the constructor requires one
        store_path = self._store_path(path)
        if not store_path:
            raise FsError(errno.EBUSY)
        with errno_for(f"rmdir {path}"):
            if not self._entry(path).is_dir:
                raise FsError(errno.ENOTDIR)
            if self.writeback.any_under(store_path):
                raise FsError(errno.ENOTEMPTY)
            self.store.rmdir(store_path)
        self.meta.forget(store_path)
        self.attrs.changed_dir_of(store_path)
        self.meta.forget(store_path.rpartition("/")[0])  # its link count changed

    def rename(self, old: str, new: str, no_replace: bool = False) -> None:
        """A file, or a directory with everything in it (as storage renames
        directories: atomic on file shares and local directories, object by
        object on blob, see ObjectStore.rename_dir).
        `no_replace` (RENAME_NOREPLACE) fails with EEXIST if `new` exists."""
        self._writable()
        assert self.writeback is not None  # read-write: the constructor requires one
        src, dst = self._store_path(old), self._store_path(new)
        if not src or not dst:
            raise FsError(errno.EBUSY)
        if dst == src:
            return
        if is_within(dst, src):  # (dst == src returned above): into itself
            raise FsError(errno.EINVAL)
        with errno_for(f"rename {old} to {new}"):
            for sf in self.writeback.under(src):
                self._upload(sf)  # storage holds the newest bytes before they move
            source = self._entry(old)
            self._parent_dir(new)
            self._make_way(source, new, dst, no_replace)
            if self.writeback.get(dst):
                self.writeback.unlink(dst)  # replaced: its handles keep the old bytes
            follow = self._handles.follow_readers(self.store, src, dst)
            (self.store.rename_dir if source.is_dir else self.store.rename)(src, dst)
            self.writeback.rename(src, dst)
            follow()
        for p in (src, dst):
            self.meta.forget(p)
        self.attrs.changed_dir_of(src, dst)
        if source.is_dir:
            self.meta.clear()  # cached entries below the old name are all wrong now

    def _make_way(self, source: Entry, new: str, dst: str, no_replace: bool) -> None:
        """Check what `new` holds against `source` as rename(2) does, and
        make way for it: an empty directory there goes; a file's readers
        keep a copy of what they read."""
        try:
            target = self._entry(new)
        except FsError as e:
            if e.errno != errno.ENOENT:
                raise
            target = None
        if no_replace and (target is not None or self._wb.get(dst)):
            raise FsError(errno.EEXIST)
        if target is None:
            return
        if source.is_dir != target.is_dir:
            raise FsError(errno.ENOTDIR if source.is_dir else errno.EISDIR)
        if target.is_dir:
            if any(True for _ in self.meta.list_dir(dst)) or self._wb.any_under(dst):
                raise FsError(errno.ENOTEMPTY)
            self.store.rmdir(dst)
        else:
            self._handles.keep_open_readers(self._wb, dst)

    def utimens(self, path: str, times_ns: tuple[int, int] | None) -> None:
        """Sets the times of a file being written (storage sets its own
        modification time when the file is uploaded); accepted and without
        effect otherwise, so `touch` and `cp -p` work."""
        self._writable()
        assert self.writeback is not None  # read-write: the constructor requires one
        with self._borrowed(self._store_path(path)) as sf:
            if sf is not None:
                with errno_for(f"utimens {path}"):
                    self.writeback.touch(sf, times_ns)
                return
        self._entry(path)

    def chmod(self, path: str, mode: int) -> None:
        """Storage keeps no permissions: accepted (tools like `shutil.copy`
        and `cp -p` set them) and without effect; the mode bits stay fixed."""
        self._writable()
        assert self.writeback is not None  # read-write: the constructor requires one
        if not self.writeback.get(self._store_path(path)):
            self._entry(path)

    def chown(self, path: str, uid: int, gid: int) -> None:
        """Owners are the mount's: a change to anyone else is refused."""
        self._writable()
        if uid not in (-1, self.attrs.uid) or gid not in (-1, self.attrs.gid):
            raise FsError(errno.EPERM)
        self.chmod(path, 0)

    def close_writes(self) -> int:
        """At unmount: upload what is still unflushed; the number left pending."""
        return self.writeback.close() if self.writeback else 0

    def open_handles(self) -> int:
        return len(self._handles)

    def counters(self) -> dict:
        """The mount's numbers for `mountd status`."""
        with self._counting:
            out = {"bytes_served": self.bytes_served, "read_errors": self.read_errors, "calls": dict(self.calls)}
        out.update({"open_files": len(self._handles), "cache": self.blocks.counters()})
        if self.writeback:
            out["writes"] = self.writeback.counters()
        return out

    def statfs(self) -> dict:
        return statfs(self.name_limits)

    def close(self) -> None:
        left = self.close_writes()
        if left:
            log.error("%d written file(s) could not be uploaded at unmount; they are kept with their journal "
                      "jobs, and `mountd resume` uploads them", left)
        self.blocks.close()
        self.store.close()
