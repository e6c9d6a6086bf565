"""FUSE glue: mfusepy callbacks that hand each call to FileSystemCore.

Nothing here decides anything; it converts arguments and sets the kernel's
options (large reads, attribute timeouts, page-cache reuse), and offers the
core a way to make the kernel forget what it caches of a path (kernel opens).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import queue
import re
import threading

# libfuse 3 first: mfusepy would otherwise pick libfuse 2 when both exist,
# which caps reads at 128 KiB.
os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")

import mfusepy  # noqa: E402

from mountd.fs.core import FileSystemCore  # noqa: E402

MAX_READ = 1024 * 1024  # bytes per FUSE read request
MAX_READAHEAD = 16 * 1024 * 1024  # how far ahead the kernel may read on its own
# Requests the kernel keeps in flight without a process waiting on them
# (readahead), and the count past which it stops reading ahead. Its
# defaults (12 and 9) cap one reader's readahead at 9 requests of 1 MiB,
# under the 16 it asks for: the kernel then skips reading ahead and the
# reader waits on each request in turn. At 64/48 a cold 1 GiB read of a
# local datastore through the mount took 0.94 s instead of 1.33 (medians
# of 10, alternated); 64 leaves room for four sequential readers.
MAX_BACKGROUND = 64
CONGESTION_THRESHOLD = 48
LOOP_ENDED_BY_SIGNAL = 8  # fuse_main's result when a signal stopped its loop
RENAME_NOREPLACE = 1  # renameat2 flag (linux/fs.h)
READDIR_PLUS = 1  # libfuse: the kernel asks for attributes with the names
FILL_DIR_PLUS = 2  # libfuse: this entry carries them
CAP_READDIRPLUS_AUTO = 1 << 14  # libfuse: let the kernel decide per call whether to ask
# The name libfuse gives a file unlinked while open (lib/fuse.c, hidden_name):
# it renames the file to it, and unlinks that name at the file's last close.
# Storage must never see it: a rename to it is the unlink. (libfuse's
# hard_remove would spare the rename, but then fstat, ftruncate and fchmod
# of the open file fail: libfuse has no path left to give them.)
LIBFUSE_HIDDEN = re.compile(r"\.fuse_hidden[0-9a-f]{16}")
CAP_NO_OPEN_SUPPORT = 1 << 17  # libfuse: the kernel takes ENOSYS from open as "open files yourself"
ROOT_NODE = 1  # the kernel's node id of the mount's root (FUSE_ROOT_ID)

log = logging.getLogger(__name__)

# Whether this libfuse thread's Python thread state has been kept (see _Fuse._wrapper).
_kept = threading.local()


def _keep_thread_state() -> None:
    """Keep the calling thread's Python thread state past the current
    callback. libfuse's threads are not Python's: ctypes makes a thread
    state for each callback and deletes it after, and with it the data
    stack Python maps for it (an mmap and a munmap, whose TLB flush
    interrupts every core) and every thread-local value. One more
    PyGILState_Ensure, never released, keeps it: later callbacks of the
    thread only take the interpreter lock. libfuse keeps its threads for
    the mount's life (max_idle_threads is unlimited by default; a thread it
    ends leaves its state behind, a few hundred bytes)."""
    ctypes.pythonapi.PyGILState_Ensure()
    _kept.state = True


class _Fuse(mfusepy.FUSE):
    """mfusepy's FUSE, passing renameat2's flags on (it drops them, so
    `mv --no-clobber` would silently replace), reading into libfuse's
    own buffer (mfusepy's read wants a bytes object, which costs a copy of
    every byte on the way: a cold read spends its CPU on copies), and
    keeping each libfuse thread's Python thread state from one callback to
    the next (`_keep_thread_state`)."""

    def _wrapper(self, func, *args, **kwargs):
        if not getattr(_kept, "state", False):
            _keep_thread_state()
        return super()._wrapper(func, *args, **kwargs)

    def read(self, path, buf, size: int, offset: int, fip) -> int:
        dest = (ctypes.c_ubyte * size).from_address(ctypes.addressof(buf.contents))
        return self.operations.read(path, fip.contents, memoryview(dest).cast("B"), offset)

    def readdir_fuse_3(self, path, buf, filler, offset: int, fip, flags: int) -> int:
        # mfusepy hands the kernel names only, so `ls -l` of a directory of
        # 20 000 blobs costs 20 000 lookups, one thread wake-up each. The
        # listing already has every child's attributes: with readdirplus they
        # go along with the names, and the kernel asks nothing more. (libfuse
        # 3.14 passes them on only for entries given with an offset.)
        plus = FILL_DIR_PLUS if flags & READDIR_PLUS else 0
        st = mfusepy.c_stat()
        for off, (name, attrs) in self.operations.readdir_at(fip.contents.fh, offset):
            if attrs is None:
                stat_p = None
            else:
                ctypes.memset(ctypes.byref(st), 0, ctypes.sizeof(st))
                mfusepy.set_st_attrs(st, attrs, use_ns=True)
                stat_p = st
            if filler(buf, name.encode(self.encoding, self.errors), stat_p, off, plus if stat_p else 0) != 0:
                break  # the kernel's buffer is full: the next call goes on from here
        return 0

    def rename_fuse_3(self, old: bytes, new: bytes, flags: int) -> int:
        return self.operations.rename(old.decode(self.encoding, self.errors),
                                      new.decode(self.encoding, self.errors), flags)


def tune_kernel_readahead(device: str) -> bool:
    """Raise the kernel's readahead for the mount whose device is `device`
    ("major:minor") to MAX_READAHEAD. The kernel caps a FUSE mount's
    readahead at its 128 KiB default whatever the filesystem asks for, and
    readahead decides the size of read requests: at 128 KiB a 1 GiB file
    costs 8192 calls instead of 1024. Needs root."""
    try:
        with open(f"/sys/class/bdi/{device}/read_ahead_kb", "w") as f:
            f.write(str(MAX_READAHEAD // 1024))
        return True
    except OSError:
        return False


class _KernelCache:
    """The core's KernelCache over libfuse's notifications. Dropping pages
    waits for the reads in flight on the file, so it runs on a thread of its
    own, never on one serving a request; expiring attributes waits on
    nothing and is done at once."""

    def __init__(self, fuse: int, mountpoint: str):
        lib = mfusepy._libfuse
        lib.fuse_get_session.restype = ctypes.c_void_p
        lib.fuse_get_session.argtypes = [ctypes.c_void_p]
        lib.fuse_invalidate_path.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.fuse_lowlevel_notify_inval_inode.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_int64,
                                                         ctypes.c_int64]
        self._lib, self._fuse, self._mountpoint = lib, fuse, mountpoint
        self._session = lib.fuse_get_session(fuse)
        self._lock = threading.Lock()  # held by page drops: libfuse is not torn down under one
        self._closed = False
        self._drops: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._drop_pages, name="kernel-cache", daemon=True).start()

    def forget_attributes(self, path: str) -> None:
        # libfuse numbers the kernel's nodes itself and reports the numbers
        # as st_ino (use_ino is off); the kernel's cached attributes give it
        # without a request. Offset -1: attributes only, no page touched.
        node = _cached_inode(self._mountpoint + path)
        err = 0 if self._closed else self._lib.fuse_lowlevel_notify_inval_inode(self._session, node, -1, 0)
        if err and err != -errno.ENOENT:  # ENOENT: the kernel holds nothing of it
            raise OSError(-err, os.strerror(-err))

    def forget_data(self, path: str, done) -> None:
        self._drops.put((path, done))

    def _drop_pages(self) -> None:
        while True:
            path, done = self._drops.get()
            try:
                with self._lock:
                    err = 0 if self._closed else self._lib.fuse_invalidate_path(self._fuse, os.fsencode(path))
                if err and err != -errno.ENOENT:
                    log.warning("could not have the kernel drop its pages of %s: %s", path, os.strerror(-err))
            finally:
                done()

    def close(self) -> None:
        # a drop still waiting on pages ends with the connection: wait for
        # it a little, never for ever
        held = self._lock.acquire(timeout=5)
        self._closed = True
        if held:
            self._lock.release()


_libc = ctypes.CDLL(None, use_errno=True)
AT_FDCWD, AT_STATX_DONT_SYNC, STATX_INO = -100, 0x4000, 0x100
STATX_INO_OFFSET = 32  # of stx_ino in struct statx


def _cached_inode(path: str) -> int:
    """The inode number of `path` from the kernel's cached attributes
    (statx AT_STATX_DONT_SYNC: no request to the filesystem for them)."""
    buf = ctypes.create_string_buffer(256)
    if _libc.statx(AT_FDCWD, os.fsencode(path), AT_STATX_DONT_SYNC, STATX_INO, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return ctypes.c_uint64.from_buffer(buf, STATX_INO_OFFSET).value


class FuseOperations(mfusepy.Operations):
    use_ns = True  # times in nanoseconds

    def __init__(self, core: FileSystemCore, on_ready=None, mountpoint: str = ""):
        self.core = core
        self.on_ready = on_ready
        self.mountpoint = mountpoint
        self.kernel_cache: _KernelCache | None = None

    def init_with_config(self, conn, config):
        if conn is not None:
            conn.max_read = MAX_READ
            conn.max_readahead = MAX_READAHEAD
            # libfuse sizes the kernel's pages per request from max_write:
            # without it reads arrive in 128 KiB pieces whatever max_read says.
            conn.max_write = MAX_READ
            conn.max_background = MAX_BACKGROUND
            conn.congestion_threshold = CONGESTION_THRESHOLD
            # readdirplus for every listing, not only when the kernel guesses
            # attributes will be wanted: they cost nothing extra here
            conn.want &= ~CAP_READDIRPLUS_AUTO
            if conn.capable & CAP_NO_OPEN_SUPPORT:
                fuse = mfusepy._libfuse.fuse_get_context().contents.fuse  # set while libfuse runs init
                kernel_cache = _KernelCache(fuse, self.mountpoint)
                if self.core.let_kernel_open(kernel_cache):
                    self.kernel_cache = kernel_cache
                else:
                    kernel_cache.close()
        if config is not None:
            ttl = self.core.settings.attribute_ttl
            config.attr_timeout = ttl
            config.entry_timeout = ttl
            config.negative_timeout = self.core.settings.negative_ttl
            config.use_ino = 0
            # libfuse then opens every file with direct_io (and no keep_cache)
            config.direct_io = 1 if self.core.settings.direct_io else 0
        if self.on_ready:
            self.on_ready()

    def destroy(self, path):
        if self.kernel_cache is not None:
            self.kernel_cache.close()
        self.core.close()

    def getattr(self, path, fh=None):
        return self.core.getattr(path)

    def opendir(self, path):
        return self.core.opendir(path)

    def readdir(self, path, fh):
        # registers the callback; _Fuse.readdir_fuse_3 serves it through readdir_at
        raise OSError(errno.ENOSYS, "served by readdir_at")

    def readdir_at(self, dh, offset):
        return self.core.readdir_at(dh, offset)

    def releasedir(self, path, fh):
        self.core.releasedir(fh)
        return 0

    def open(self, path, fi):
        fh, keep = self.core.open(path, fi.flags)
        fi.fh = fh
        fi.keep_cache = 1 if keep else 0
        return 0

    def create(self, path, mode, fi):
        fi.fh = self.core.create(path, fi.flags)
        return 0

    def read(self, path, fi, dest, offset):
        # called by _Fuse.read with libfuse's buffer (not mfusepy's signature);
        # handle 0: a file the kernel opened itself
        if fi.fh:
            return self.core.read_into(fi.fh, dest, offset)
        return self.core.read_path_into(os.fsdecode(path), dest, offset)

    def write(self, path, data, offset, fi):
        return self.core.write(fi.fh, data, offset)

    def flush(self, path, fi):
        self.core.flush(fi.fh)
        return 0

    def fsync(self, path, datasync, fi):
        self.core.flush(fi.fh)
        return 0

    def release(self, path, fi):
        self.core.release(fi.fh)
        return 0

    def truncate(self, path, length, fi=None):
        self.core.truncate(path, length, fi.fh if fi is not None else None)
        return 0

    def unlink(self, path):
        self.core.unlink(path)
        return 0

    def mkdir(self, path, mode):
        self.core.mkdir(path)
        return 0

    def rmdir(self, path):
        self.core.rmdir(path)
        return 0

    def rename(self, old, new, flags=0):
        if flags & ~RENAME_NOREPLACE:  # RENAME_EXCHANGE, RENAME_WHITEOUT: storage cannot swap atomically
            raise OSError(errno.EINVAL, "rename flags not supported")
        if LIBFUSE_HIDDEN.fullmatch(os.path.basename(new)):
            self.core.unlink(old, keep_as=new)
            return 0
        self.core.rename(old, new, no_replace=bool(flags & RENAME_NOREPLACE))
        return 0

    def utimens(self, path, times=None):
        self.core.utimens(path, times)
        return 0

    def chmod(self, path, mode):
        self.core.chmod(path, mode)
        return 0

    def chown(self, path, uid, gid):
        self.core.chown(path, uid, gid)
        return 0

    # Storage has no links, device nodes or extended attributes.
    def symlink(self, target, source):
        raise OSError(errno.ENOTSUP, "symbolic links are not supported")

    def link(self, target, source):
        raise OSError(errno.ENOTSUP, "hard links are not supported")

    def mknod(self, path, mode, dev):
        raise OSError(errno.ENOTSUP, "device nodes are not supported")

    def setxattr(self, path, name, value, options, position=0):
        raise OSError(errno.ENOTSUP, "extended attributes are not supported")

    def statfs(self, path):
        return self.core.statfs()


def serve(core: FileSystemCore, mountpoint: str, fsname: str, read_only: bool = True,
          allow_other: bool = False, on_ready=None, debug: bool = False) -> None:
    """Mount and serve until unmounted. `on_ready` runs once the kernel has
    accepted the mount."""
    options = dict(fsname=fsname, subtype="mountd", max_read=MAX_READ, nothreads=False, foreground=True,
                   auto_unmount=True, debug=debug)
    if read_only:
        options["ro"] = True
    if allow_other:
        options["allow_other"] = True
        options["default_permissions"] = True
    try:
        _Fuse(FuseOperations(core, on_ready, mountpoint), mountpoint, raw_fi=True, **options)
    except RuntimeError as e:
        # libfuse's main returns 8 when its loop ended on SIGINT/SIGTERM/SIGHUP:
        # the mount was stopped on purpose and is gone; anything else failed.
        if e.args != (LOOP_ENDED_BY_SIGNAL,):
            raise
