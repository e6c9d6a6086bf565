"""Local files written whole or not at all: downloads and the disk cache
(`NewFile`), and mountd's own small files (`write_atomic`: records, journal, workspace).

Two things every file written from storage data needs:

- it appears under its name only once complete: it is created unnamed in its
  directory (O_TMPFILE) and linked into place at the end, so no reader ever
  sees half a file and a crash leaves nothing behind. Where the filesystem
  cannot (no O_TMPFILE, no /proc), a hidden temporary name and a rename do
  the same, minus the clean crash;
- large files bypass the page cache (O_DIRECT) where the filesystem allows:
  staging a dataset bigger than memory then neither evicts what the node has
  cached nor piles up dirty pages against a container's memory limit, and the
  kernel does not copy each byte once more. Only whole aligned pages go that
  way; the unaligned edges of a write go through the page cache, so a page
  is only ever written one way.

And the memory those writes come from: page-aligned buffers (`aligned_buffer`),
as direct I/O requires.

mountd's own state (run records, journal jobs, the workspace file, stored
secrets) is small and written in one call: `write_atomic` replaces a file in
one step, and with `durable` also makes the new file survive a crash.
"""

from __future__ import annotations

import ctypes
import errno
import itertools
import mmap
import os
import threading
from contextlib import contextmanager
from typing import BinaryIO, Iterator

ALIGN = 4096  # direct I/O alignment of offsets, lengths and buffer addresses
# O_TMPFILE, or linking it into place through /proc, refused: use a named temporary.
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOENT, errno.EXDEV, errno.EPERM}
_serial = itertools.count()
_root_fd: int | None = None
_HAVE_PROC = os.path.isdir("/proc/self/fd")  # an unnamed file is named through /proc
FALLOC_FL_KEEP_SIZE = 1


def _libc_fallocate():
    """fallocate(2) itself: posix_fallocate would write zeros where the
    filesystem cannot allocate, which is worse than not reserving."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).fallocate
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fn.restype = ctypes.c_int
    return fn


_fallocate = _libc_fallocate()


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def aligned_buffer(size: int) -> mmap.mmap:
    """`size` bytes (rounded up to a page) of private memory, page-aligned.
    Asks for huge pages where the kernel gives them on request: a buffer is
    touched once and reused, and 2 MiB pages fault in 512 times fewer steps."""
    buf = mmap.mmap(-1, align_up(max(size, 1)), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass
    return buf


def _address(view) -> int | None:
    try:
        return ctypes.addressof(ctypes.c_char.from_buffer(view))
    except (TypeError, ValueError):  # read-only or empty: never direct
        return None


def _proc_fd(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def _beside(final: str) -> str:
    """A hidden temporary name in the directory of `final`."""
    head, tail = os.path.split(final)
    return os.path.join(head or ".", f".{tail}.{os.getpid()}-{next(_serial)}.partial")


def _link_fd(fd: int, path: str) -> None:
    """Give the unnamed file open as `fd` the name `path` (EEXIST if taken)."""
    global _root_fd
    if _root_fd is None:
        _root_fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    # A directory fd makes os.link use linkat(AT_SYMLINK_FOLLOW): /proc's
    # link is followed to the file itself.
    os.link(_proc_fd(fd), path, src_dir_fd=_root_fd)


class NewFile:
    """A file being written to `final`, invisible until `finish()`.

    pwrite() may be called from several threads at once for disjoint
    ranges. With `direct`, the page-aligned part of each write goes around
    the page cache where the filesystem supports it."""

    def __init__(self, final: str, direct: bool = False, mode: int = 0o644):
        self.final = final
        self.tmp: str | None = None  # the temporary name, when O_TMPFILE was refused
        self.direct = False  # whether `fd` writes around the page cache
        self._plain: int | None = None  # an ordinary descriptor of the same file, opened when needed
        self._lock = threading.Lock()
        directory = os.path.dirname(final) or "."
        tries = (os.O_DIRECT, 0) if direct else (0,)  # tmpfs and some others refuse O_DIRECT
        self.fd = -1
        for extra in tries if _HAVE_PROC else ():
            try:
                self.fd = os.open(directory, os.O_RDWR | os.O_TMPFILE | extra, mode)
                self.direct = bool(extra)
                break
            except OSError as e:
                if e.errno not in _NO_TMPFILE:
                    raise
        if self.fd < 0:
            self.tmp = _beside(final)
            self.fd = os.open(self.tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, mode)
            if direct:
                try:
                    direct_fd = os.open(self.tmp, os.O_RDWR | os.O_DIRECT)
                except OSError:
                    pass
                else:
                    self._plain, self.fd, self.direct = self.fd, direct_fd, True

    def reserve(self, size: int) -> None:
        """Allocate the file's disk space up front (its size stays as
        written): ENOSPC now rather than part-way, and one extent instead of
        pieces allocated as parallel writes arrive. A filesystem that cannot
        is left to allocate as it goes."""
        if size <= 0 or _fallocate is None:
            return
        if _fallocate(self.fd, FALLOC_FL_KEEP_SIZE, 0, size) != 0:
            err = ctypes.get_errno()
            if err == errno.ENOSPC:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            # EOPNOTSUPP, ENOSYS, ...: nothing reserved, nothing lost

    def _plain_fd(self) -> int:
        if not self.direct:
            return self.fd
        with self._lock:
            if self._plain is None:
                self._plain = os.open(self.tmp or _proc_fd(self.fd), os.O_RDWR)
            return self._plain

    def pwrite(self, view, offset: int) -> None:
        """Write all of `view` at `offset`."""
        view = memoryview(view).cast("B") if not isinstance(view, memoryview) else view
        end = offset + len(view)
        if self.direct and len(view) >= ALIGN:
            lo, hi = align_up(offset), end // ALIGN * ALIGN
            address = _address(view)
            if hi > lo and address is not None and (address + lo - offset) % ALIGN == 0:
                try:
                    self._all(self.fd, view[lo - offset:hi - offset], lo)
                except OSError as e:
                    if e.errno != errno.EINVAL:
                        raise
                    self._all(self._plain_fd(), view[lo - offset:hi - offset], lo)  # accepted at open, refused now
                if lo > offset:
                    self._all(self._plain_fd(), view[:lo - offset], offset)
                if end > hi:
                    self._all(self._plain_fd(), view[hi - offset:], hi)
                return
        self._all(self._plain_fd(), view, offset)

    @staticmethod
    def _all(fd: int, view: memoryview, offset: int) -> None:
        while len(view):
            n = os.pwrite(fd, view, offset)
            view, offset = view[n:], offset + n

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def chunks(self, buf: memoryview):
        """The file's bytes from the start, a `buf` at a time (for checksums)."""
        offset, fd = 0, self._plain_fd()
        while n := os.preadv(fd, [buf], offset):
            yield buf[:n]
            offset += n

    def finish(self, mtime: float | None = None, overwrite: bool = True) -> None:
        """Put the file under its name (replacing what is there if
        `overwrite`, else FileExistsError), with `mtime` if given."""
        if mtime:
            os.utime(self.fd, (mtime, mtime))
        try:
            if self.tmp is None:
                self._link(overwrite)
            elif overwrite:
                os.replace(self.tmp, self.final)
            else:
                os.link(self.tmp, self.final)
                os.unlink(self.tmp)
            self.tmp = None
        finally:
            self.discard()

    def _link(self, overwrite: bool) -> None:
        try:
            _link_fd(self.fd, self.final)
            return
        except FileExistsError:
            if not overwrite:
                raise
        # taken: link beside it, then rename over it in one step
        beside = _beside(self.final)
        _link_fd(self.fd, beside)
        try:
            os.replace(beside, self.final)
        except OSError:
            os.unlink(beside)
            raise

    def discard(self) -> None:
        """Close; an unfinished file is gone (unnamed) or its temporary removed."""
        if self._plain is not None and self._plain != self.fd:
            os.close(self._plain)
        self._plain = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.tmp is not None:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.tmp = None


@contextmanager
def replacing(path: str, mode: int = 0o600, durable: bool = False) -> Iterator[BinaryIO]:
    """A binary file whose contents replace `path` in one step when the block
    ends without error: a reader (or a crash) sees the old file or the new,
    never part of one; on error the new one is gone. `mode` is exact (not
    masked). With `durable`, the file and then its directory are fsynced, so
    after a crash the new file is there whole (or the old one is)."""
    tmp = _beside(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask applied at open; the caller's mode is the one wanted
        with os.fdopen(fd, "wb") as f:
            fd = -1  # the file object closes it from here
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    if durable:
        sync_dir(os.path.dirname(path))


def write_atomic(path: str, data: bytes, mode: int = 0o600, durable: bool = False) -> None:
    """Replace `path` with `data` in one step (see `replacing`)."""
    with replacing(path, mode, durable) as f:
        f.write(data)


def sync_dir(path: str) -> None:
    """fsync a directory: makes the names created or renamed in it durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
