"""Bulk download: every object under a prefix to TARGET/<full object name>.

Small files are fetched in one request each, many at a time; a large file is
read as a few long ranges in parallel, pinned to the etag listed and written
in place as they stream in, around the page cache (see `mountd.fileio`).
Every file is written unnamed (or under a temporary name) and appears under
its own only once complete and verified (size, and MD5 where storage keeps
one), so a failure never leaves half a file under the real name.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading

from mountd.errors import MountdError
from mountd.fileio import NewFile, aligned_buffer
from mountd.storage.base import Entry, ObjectStore
from mountd.transfer.pool import BoundedPool
from mountd.transfer.progress import Progress, TransferReport

log = logging.getLogger(__name__)

CHUNK_SIZE = 16 * 1024 * 1024  # files up to this size take one request; the buffer each worker reads into
STREAMS = 4  # long ranged reads in parallel per large file
WRITE_SIZE = 1024 * 1024  # bytes per write of a streamed range
DEFAULT_WORKERS = 16


class UnsafeName(MountdError):
    pass


class _Cancelled(Exception):
    """The transfer was interrupted: a stream stops at its next piece."""


def local_path_for(target_dir: str, name: str) -> str:
    """Where object `name` lands under target_dir; refuses names that would
    land elsewhere (absolute, '..', '.', empty parts, backslashes, NUL)."""
    if not name or name.startswith("/") or "\\" in name or "\0" in name:
        raise UnsafeName(f"refusing unsafe object name {name!r}")
    parts = name.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise UnsafeName(f"refusing unsafe object name {name!r}")
    return os.path.join(target_dir, *parts)


_buffers = threading.local()


def _chunk_buffer() -> memoryview:
    """This thread's reusable buffer for streamed ranges and small files,
    page-aligned for direct I/O. 1 MiB: the kernel takes a file write of
    1 MiB at a third of the CPU cost per byte of a 16 MiB one (measured
    here), and a fresh buffer per range costs faults."""
    view = getattr(_buffers, "view", None)
    if view is None:
        view = _buffers.view = memoryview(aligned_buffer(WRITE_SIZE))
    return view


def _check_target(final: str, entry: Entry, overwrite: bool) -> bool:
    """False if an existing file is to be kept: always when it is unchanged
    (same size, and the object's modification time, which a download sets),
    else unless `overwrite`. OSError if it cannot be replaced."""
    try:
        st = os.lstat(final)
    except FileNotFoundError:
        return True
    if os.path.isdir(final) and not os.path.islink(final):
        raise OSError(0, "a local directory is in the way")
    if st.st_size == entry.size and entry.mtime and abs(st.st_mtime - entry.mtime) < 1e-3:
        return False
    return overwrite


class _Download:
    """One large file on its way: a temporary file filled by a few long
    ranged reads in parallel (as `rclone` does with its streams), each
    written in place as it arrives."""

    def __init__(self, job: "_DownloadJob", entry: Entry, final: str):
        self.job, self.entry, self.final = job, entry, final
        self.file = NewFile(final, direct=True)
        self.file.reserve(entry.size)  # a disk too small fails now, not after gigabytes
        part = max(CHUNK_SIZE, -(-entry.size // STREAMS))
        self.parts = [(start, min(part, entry.size - start)) for start in range(0, entry.size, part)] or [(0, 0)]
        self.lock = threading.Lock()
        self.remaining = len(self.parts)
        self.error: str | None = None
        self.running = 0  # parts being fetched now: the file is closed only when none is
        self.abandoned = False
        self.finishing = False  # the last part is in: _finish owns the file

    def abandon(self) -> None:
        """The transfer stopped: drop the file now if no part is being
        fetched, else when the last one running returns (closing it under a
        worker that writes could hand the descriptor to another file)."""
        with self.lock:
            if self.finishing:
                return
            self.abandoned = True
            idle = self.running == 0
        if idle:
            self.file.discard()

    def fetch(self, start: int, length: int) -> None:
        with self.lock:
            if self.abandoned:
                return
            self.running += 1
        def sink(offset: int, piece: memoryview) -> None:
            if self.job.cancelled.is_set():
                raise _Cancelled()
            self.file.pwrite(piece, offset)
            self.job.progress.bytes_moved(len(piece))
        try:
            if self.error is None and length > 0:
                got = self.job.store.read_stream(self.entry.path, start, length, self.entry.etag,
                                                 _chunk_buffer(), sink)
                if got != length:
                    raise MountdError(f"short read: {got} of {length} bytes at {start}")
        except Exception as e:  # recorded per file; the transfer goes on
            with self.lock:
                self.error = self.error or str(e)
        with self.lock:
            self.running -= 1
            self.remaining -= 1
            drop = self.abandoned and self.running == 0
            last = self.finishing = self.remaining == 0 and not self.abandoned
        if drop:
            self.file.discard()
        elif last:
            self._finish()

    def _md5_of_file(self) -> bytes:
        """Parts arrive out of order, so the file is hashed once complete
        (from the page cache) rather than as it streams in."""
        md5 = hashlib.md5()
        for chunk in self.file.chunks(_chunk_buffer()):
            md5.update(chunk)
        return md5.digest()

    def _finish(self) -> None:
        with self.job.lock:
            self.job.unfinished.discard(self)
        try:
            if self.error is None and self.file.size() != self.entry.size:
                self.error = "size does not match what storage holds"
            if self.error is None and self.entry.md5 is not None and self._md5_of_file() != self.entry.md5:
                self.error = "content MD5 does not match what storage holds"
            if self.error is None:
                self.file.finish(self.entry.mtime)
                self.job.progress.file_done()
                return
        except OSError as e:
            self.error = e.strerror or str(e)
        self.file.discard()
        self.job.failed(self.entry, self.error)


class _DownloadJob:
    def __init__(self, store: ObjectStore, target_dir: str, overwrite: bool, progress: Progress,
                 relative_to: str = ""):
        self.store, self.target_dir, self.overwrite, self.progress = store, target_dir, overwrite, progress
        self.strip = len(relative_to.rstrip("/")) + 1 if relative_to else 0
        self._made_dirs: set[str] = set()
        self.unfinished: set[_Download] = set()  # for clean-up after an abort
        self.lock = threading.Lock()
        # Set when the transfer is interrupted: workers stop at their next
        # piece or file, and each discards the file it was filling itself
        # (closing it under a worker still writing gave EBADF).
        self.cancelled = threading.Event()

    def makedirs(self, path: str) -> None:
        if path not in self._made_dirs:  # a set lookup instead of a system call per file
            os.makedirs(path, exist_ok=True)
            self._made_dirs.add(path)

    def plan(self, entry: Entry, pool: BoundedPool) -> None:
        """Runs on the listing thread: keep it light, so the workers are fed.
        Small files are checked, fetched and placed entirely by a worker."""
        try:
            final = local_path_for(self.target_dir, entry.path[self.strip:])
        except UnsafeName as e:
            self.failed(entry, str(e))
            return
        if entry.is_dir:
            try:
                self.makedirs(final)
                self.progress.report.directories += 1
            except OSError as e:
                self.failed(entry, e.strerror or str(e))
            return
        if entry.size <= CHUNK_SIZE:
            pool.submit(self.small_file, entry, final)
            return
        try:
            if not _check_target(final, entry, self.overwrite):
                self.progress.skipped()
                return
            self.makedirs(os.path.dirname(final))
            download = _Download(self, entry, final)
        except OSError as e:
            self.failed(entry, e.strerror or str(e))
            return
        self.progress.add_total(entry.size)
        with self.lock:
            self.unfinished.add(download)
        for start, length in download.parts:
            pool.submit(download.fetch, start, length)

    def small_file(self, entry: Entry, final: str) -> None:
        if self.cancelled.is_set():
            return
        new = None
        try:
            if not _check_target(final, entry, self.overwrite):
                self.progress.skipped()
                return
            self.progress.add_total(entry.size)
            self.makedirs(os.path.dirname(final))
            # into this thread's buffer when it fits: no allocation per file
            buf = _chunk_buffer() if entry.size <= WRITE_SIZE else memoryview(bytearray(entry.size))
            data = buf[:self.store.read_into(entry.path, 0, buf[:entry.size], entry.etag)] if entry.size else b""
            if len(data) != entry.size:
                raise OSError(0, "size does not match what storage holds")
            if entry.md5 is not None and hashlib.md5(data).digest() != entry.md5:
                raise OSError(0, "content MD5 does not match what storage holds")
            new = NewFile(final)
            new.pwrite(data, 0)
            new.finish(entry.mtime)
            new = None
            self.progress.bytes_moved(entry.size)
            self.progress.file_done()
        except (OSError, MountdError) as e:
            self.failed(entry, getattr(e, "strerror", None) or str(e))
        finally:
            if new is not None:
                new.discard()

    def failed(self, entry: Entry, reason: str) -> None:
        if self.cancelled.is_set():
            return  # not a failure of the file: the transfer was stopped
        self.progress.failed(entry.path, reason)
        log.error("download of %s failed: %s", entry.path, reason)


def download(store: ObjectStore, target_dir: str, prefix: str = "", overwrite: bool = False,
             workers: int = DEFAULT_WORKERS, show_progress: bool = True, relative_to: str = "",
             label: str | None = None, progress: Progress | None = None) -> TransferReport:
    """Download every object whose name starts with `prefix` (a plain string
    prefix) to target_dir/<full name>, or, with `relative_to` (a directory
    the prefix lies in), to target_dir/<name below that directory>. Existing
    files are skipped unless `overwrite`; unchanged ones always. Per-file
    failures are in the report; listing failures raise. A caller that
    watches the transfer passes its own `progress`."""
    target_dir = os.path.abspath(target_dir)
    os.makedirs(target_dir, exist_ok=True)
    progress = progress or Progress(TransferReport("downloaded"), enabled=show_progress, label=label)
    job = _DownloadJob(store, target_dir, overwrite, progress, relative_to)
    try:
        with BoundedPool(workers, "download") as pool:
            for entry in store.walk(prefix or ""):
                job.plan(entry, pool)
    except BaseException:
        job.cancelled.set()  # (an interrupt, or a listing that failed)
        raise
    finally:
        for leftover in list(job.unfinished):  # only after an abort: drop partial files
            leftover.abandon()
        report = progress.close()
    return report
