"""The write path of a read-write mount: files being written live as staged
copies on local disk and go to storage, journaled, when they are closed or
fsynced.

A staged copy is made when a file is created or opened for writing (filled
from storage first unless the open truncates), shared by every handle of the
file on this mount, and read by them too, so the mount sees its own writes at
once. A copy's descriptor stays open while anyone may use it: every handle
holds it, and so does each path-based caller (stat, listing, utimens) for
the moment it reads it (`borrow`); it is closed when the last of them lets
go, never under a caller still using it (a closed descriptor's number is
soon reused by another file). Flushing a changed copy records a journal job (durable before the first
byte goes up), uploads the whole file (block upload for large ones), checks
what landed and marks the job done. The copy is dropped once the last handle
is closed and storage holds its bytes; if the upload failed the copy and the
job stay for the next flush, the unmount, or `mountd resume`.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable

from mountd.errors import MountdError
from mountd.fs.errors import FsError
from mountd.journal import Job, Journal
from mountd.locks import try_lock
from mountd.paths import is_within
from mountd.storage.base import Entry, ObjectStore
from mountd.transfer.upload import upload_file

log = logging.getLogger(__name__)

COPY_CHUNK = 4 * 1024 * 1024


def staging_dir(work_dir: str) -> str:
    """Where a read-write mount keeps its staged copies."""
    return os.path.join(os.path.abspath(work_dir), "staged")


@dataclass(eq=False)
class StagedFile:
    path: str  # store path
    local: str  # the staged copy
    fd: int
    opens: int = 0  # handles open on it
    borrowed: int = 0  # path-based callers using it right now
    closed: bool = False  # its descriptor is closed and its local file gone
    version: int = 0  # bumped by every change
    uploaded: int = -1  # the version storage holds (-1: none yet)
    unlinked: bool = False
    in_storage: bool = False  # storage holds some version of this path
    job: Job | None = None  # the journal job of a failed upload, reused by the next try
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def dirty(self) -> bool:
        return self.version != self.uploaded and not self.unlinked

    def size(self) -> int:
        return os.fstat(self.fd).st_size

    def changed(self) -> None:
        self.version += 1


class WriteBack:
    """Staged copies and their uploads for one mount."""

    def __init__(self, store: ObjectStore, work_dir: str, datastore: dict, origin: str):
        self.store = store
        self.journal = Journal(work_dir)
        self.staging = staging_dir(work_dir)
        os.makedirs(self.staging, mode=0o700, exist_ok=True)
        # Held while the mount lives: `mountd resume` leaves these copies to us.
        self._lock_file = try_lock(self.staging)
        if self._lock_file is None:
            raise MountdError(f"work dir {work_dir} is in use by another read-write mount")
        self.datastore = datastore
        self.origin = origin
        self._files: dict[str, StagedFile] = {}
        self._lock = threading.Lock()
        self.uploads = 0
        self.upload_errors = 0

    def counters(self) -> dict:
        """For `mountd status`: files staged here, those not yet in storage,
        uploads done and failed."""
        with self._lock:
            files = list(self._files.values())
        return {"staged_files": len(files), "pending_uploads": sum(1 for sf in files if sf.dirty),
                "uploads": self.uploads, "upload_errors": self.upload_errors, "work_dir": os.path.dirname(self.staging)}

    # -- staged copies -----------------------------------------------------------------
    def get(self, path: str) -> StagedFile | None:
        """The staged copy of `path`, to ask whether there is one; a caller
        that uses its descriptor borrows it instead."""
        with self._lock:
            return self._files.get(path)

    @contextmanager
    def borrow(self, path: str):
        """The staged copy of `path` (or None), its descriptor open until the
        block ends even if its last handle is released meanwhile."""
        with self._lock:
            sf = self._files.get(path)
            if sf is not None:
                sf.borrowed += 1
        try:
            yield sf
        finally:
            if sf is not None:
                with self._lock:
                    sf.borrowed -= 1
                    last = self._unused(sf)
                if last:
                    self._discard(sf)

    def _unused(self, sf: StagedFile) -> bool:
        """Under self._lock: whether `sf` is no longer named by a path nor
        used by anyone, and so its copy goes now (true once only)."""
        if sf.opens > 0 or sf.borrowed > 0 or sf.closed or self._files.get(sf.path) is sf:
            return False
        sf.closed = True
        return True

    def staged_under(self, directory: str) -> list[StagedFile]:
        """Staged files directly in `directory` (store path); not those
        kept for their handles after an unlink."""
        with self._lock:
            return [sf for p, sf in self._files.items() if p.rpartition("/")[0] == directory and not sf.unlinked]

    def any_under(self, directory: str) -> bool:
        """A staged copy inside `directory` (not `directory` itself), other
        than those kept for their handles after an unlink."""
        with self._lock:
            return any(p != directory and is_within(p, directory) and not sf.unlinked
                       for p, sf in self._files.items())

    def open(self, path: str, lookup: Callable[[], Entry | None], truncate: bool) -> StagedFile:
        """The staged copy of `path`, made if needed: empty for a new file or
        a truncating open, else filled with the bytes of the entry `lookup()`
        gives from storage (asked only if there is no copy: one found is
        taken in the same step, so that its last handle cannot drop it in
        between). Counts one more open handle."""
        with self._lock:
            sf = self._files.get(path)
            if sf is not None:
                sf.opens += 1
        if sf is not None:
            if truncate and sf.size():
                self.truncate(sf, 0)
            return sf
        entry = lookup()
        local = os.path.join(self.staging, uuid.uuid4().hex)
        fd = os.open(local, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fresh = StagedFile(path, local, fd, opens=1, in_storage=entry is not None)
        try:
            if entry is not None and not truncate and entry.size:
                self._fill(fresh, entry)
            if entry is None or (truncate and entry.size):
                fresh.changed()  # a new file, or one emptied: storage must learn of it
            else:
                fresh.uploaded = fresh.version  # storage holds these bytes already
        except BaseException:
            os.close(fd)
            os.unlink(local)
            raise
        with self._lock:
            sf = self._files.get(path)
            if sf is None:
                self._files[path] = fresh
                return fresh
            sf.opens += 1  # another thread staged it meanwhile: use theirs
        os.close(fd)
        os.unlink(local)
        return sf

    def _fill(self, sf: StagedFile, entry: Entry) -> None:
        buf = memoryview(bytearray(min(COPY_CHUNK, entry.size)))

        def sink(offset: int, piece: memoryview) -> None:
            os.pwrite(sf.fd, piece, offset)
        got = self.store.read_stream(entry.path, 0, entry.size, entry.etag, buf, sink)
        if got != entry.size:
            raise MountdError(f"{entry.path}: storage gave {got} of {entry.size} bytes")

    def read_into(self, sf: StagedFile, dest: memoryview, offset: int) -> int:
        return os.preadv(sf.fd, [dest], offset)

    def write(self, sf: StagedFile, data: bytes, offset: int, append: bool = False) -> int:
        with sf.lock:
            if append:
                offset = sf.size()
            written = os.pwrite(sf.fd, data, offset)
            sf.changed()
        return written

    def truncate(self, sf: StagedFile, length: int) -> None:
        with sf.lock:
            os.ftruncate(sf.fd, length)
            sf.changed()

    def touch(self, sf: StagedFile, times_ns: tuple[int, int] | None) -> None:
        if times_ns is None:
            os.utime(sf.fd)
        else:
            os.utime(sf.fd, ns=times_ns)

    # -- to storage --------------------------------------------------------------------
    def flush(self, sf: StagedFile) -> Entry | None:
        """Upload the copy if it changed since storage last had it; the new
        entry, or None if there was nothing to do. Raises FsError(EIO)
        if storage did not take it (the copy and its journal job stay)."""
        with sf.lock:
            if not sf.dirty:
                return None
            version = sf.version
            os.fsync(sf.fd)  # acknowledged data must survive a crash of this node too
        job = sf.job
        if job is None:
            try:
                job = sf.job = self.journal.add(self.datastore, [(sf.local, sf.path)], overwrite=True,
                                                origin=f"{self.origin}: {sf.path}", staged=True)
            except OSError as e:
                # No room even for the job record: upload anyway rather than
                # hold the disk full. A crash now leaves the copy in staged/,
                # reported by the next mount, not lost.
                log.warning("cannot journal the upload of %s (%s); uploading it unjournaled", sf.path, e.strerror)
        try:
            entry = upload_file(self.store, sf.local, sf.path, overwrite=True)  # overwriting: never None
        except (MountdError, OSError) as e:
            with self._lock:  # closes upload from many FUSE threads at once
                self.upload_errors += 1
            log.error("upload of %s failed: %s; the written data is kept in %s and uploaded on the next "
                      "close, at unmount or by `mountd resume`", sf.path, e, sf.local)
            raise FsError(errno.EIO) from None
        if job is not None:  # one file, confirmed: the job ends (the copy is still ours, dropped on release)
            job.finish(keep_local=True)
            sf.job = None
        with self._lock:  # closes upload from many FUSE threads at once
            self.uploads += 1
        with sf.lock:
            sf.in_storage = True
            if sf.version == version:
                sf.uploaded = version
        return entry

    def release(self, sf: StagedFile) -> None:
        """One handle fewer; the last one drops a copy storage holds."""
        with self._lock:
            sf.opens -= 1
            if sf.opens == 0 and not sf.dirty and self._files.get(sf.path) is sf:
                del self._files[sf.path]
            last = self._unused(sf)
        if last:
            self._discard(sf)

    def _discard(self, sf: StagedFile) -> None:
        os.close(sf.fd)
        try:
            os.unlink(sf.local)
        except FileNotFoundError:
            pass

    def under(self, path: str) -> list[StagedFile]:
        """The staged copies of `path` and of everything below it."""
        with self._lock:
            return [sf for p, sf in self._files.items() if is_within(p, path)]

    def rename(self, old: str, new: str) -> None:
        """Re-key staged copies after storage renamed `old` (a file or a
        directory) to `new`. The caller flushed them first, so no journal
        job names the old path."""
        with self._lock:
            moves = [(p, sf) for p, sf in self._files.items() if is_within(p, old)]
            for p, sf in moves:
                del self._files[p]
                sf.path = new + p[len(old):]
                self._files[sf.path] = sf

    def unlink(self, path: str, keep_as: str | None = None) -> bool:
        """Forget the staged copy of a deleted file: never uploaded from now
        on, and its open handles keep reading and writing it. `keep_as` names
        it for them meanwhile (a name of the mount's own, never stored nor
        listed). True if there was a copy and storage never held the path."""
        with self._lock:
            sf = self._files.pop(path, None)
            if sf is None:
                return False
            sf.unlinked = True
            if keep_as is not None and sf.opens > 0:
                sf.path = keep_as
                self._files[keep_as] = sf
            last = self._unused(sf)
            job, sf.job = sf.job, None
        if job is not None:  # a failed upload of a file now deleted: nothing is left to upload
            job.finish(keep_local=True)
        if last:
            self._discard(sf)
        return not sf.in_storage

    def close(self) -> int:
        """At unmount: upload what is still dirty; returns how many copies
        could not be uploaded (kept, with their journal jobs)."""
        with self._lock:
            files = list(self._files.values())
        left = 0
        for sf in files:
            try:
                self.flush(sf)
            except FsError:
                left += 1
                continue
            with self._lock:
                if self._files.get(sf.path) is sf:
                    del self._files[sf.path]
                last = self._unused(sf)
            if last:
                self._discard(sf)
        if self._lock_file is not None and not self._lock_file.closed:  # None: refused in __init__
            self._lock_file.close()
        return left


def orphans(work_dir: str) -> list[str]:
    """Staged copies no journal job names: files a crashed mount had open and
    never closed. Kept (never uploaded: their writer did not finish them)."""
    staging = staging_dir(work_dir)
    try:
        names = [n for n in os.listdir(staging) if n != ".lock"]
    except FileNotFoundError:
        return []
    named = {os.path.basename(local) for job in Journal(work_dir).pending() for local, _ in job.files}
    return [os.path.join(staging, n) for n in names if n not in named]


__all__ = ["WriteBack", "StagedFile", "orphans"]
