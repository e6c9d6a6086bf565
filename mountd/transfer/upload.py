"""Bulk upload: a directory tree, or a list of files, into a datastore.

Existing objects are skipped unless `overwrite` (checked by storage
atomically, not by a listing that could go stale). Symbolic links are
followed only while they stay inside the source directory.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Iterable

from mountd.errors import AlreadyExists, MountdError, UsageError
from mountd.journal import Job
from mountd.paths import is_within, join, normalize_path
from mountd.storage.base import Entry, ObjectStore
from mountd.transfer.pool import BoundedPool
from mountd.transfer.progress import Progress, TransferReport

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 8


def _is_inside(path: str, root: str) -> bool:
    """`path` is inside `root` once symbolic links are resolved."""
    return is_within(os.path.realpath(path), os.path.realpath(root))


def plan_tree(src_dir: str, target_path: str | None) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """(files as (local, remote) pairs, empty directories' remote paths,
    refused entries as (local, reason)) for a tree."""
    if not os.path.isdir(src_dir):
        problem = "is not a directory" if os.path.exists(src_dir) else "does not exist"
        raise UsageError(f"source directory {src_dir} {problem}")
    target = normalize_path(target_path)
    files, empty_dirs, refused = [], [], []
    for dirpath, dirnames, filenames in os.walk(src_dir):
        rel_dir = os.path.relpath(dirpath, src_dir)
        remote_dir = join(target, "" if rel_dir == "." else rel_dir.replace(os.sep, "/"))
        for d in list(dirnames):
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                dirnames.remove(d)  # never descend a linked directory: it may loop or leave the tree
                log.warning("not following symbolic link to a directory: %s", full)
        for name in filenames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full) and not _is_inside(full, src_dir):
                refused.append((full, "symbolic link points outside the source directory"))
                continue
            if os.path.islink(full) and not os.path.exists(full):
                refused.append((full, "dangling symbolic link"))
                continue
            files.append((full, join(remote_dir, name)))
        if not dirnames and not filenames and rel_dir != ".":
            empty_dirs.append(remote_dir)
    return files, empty_dirs, refused


def upload_file(store: ObjectStore, local: str, remote: str, overwrite: bool, progress=None) -> Entry | None:
    """Upload one file and check what landed: storage must report as many
    bytes as the file has (the blob backend also has storage check each
    single-request upload against its MD5), and the file must not have
    changed while it was read (else it is sent again). The stored entry, or
    None if skipped (it exists and `overwrite` is off)."""
    for _ in range(3):
        before = os.stat(local)
        try:
            entry = store.write_file(remote, local, overwrite=overwrite, progress=progress)
        except AlreadyExists:
            if overwrite:  # not the skip asked for: a name storage cannot replace (a parent that is a file)
                raise
            return None
        after = os.stat(local)
        if (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
            log.warning("%s changed while it was uploaded; sending it again", local)
            overwrite = True  # the first attempt's object is ours to replace
            continue
        if entry.size != after.st_size:
            raise MountdError(f"storage holds {entry.size} bytes of {remote}, expected {after.st_size}")
        return entry
    raise MountdError(f"{local} keeps changing while it is uploaded")


COMPARE_LIMIT = 16 * 1024 * 1024  # same-size files without an MD5 in storage are compared up to this size


def differs(store: ObjectStore, local: str, remote: str) -> bool:
    """Whether storage's `remote` is another version than the file `local`
    (by size, then by MD5 where storage keeps one, else by content for
    smaller files; a larger file that cannot be compared counts as
    different, so it is reported rather than passed over in silence)."""
    import hashlib
    try:
        entry = store.stat(remote)
        size = os.path.getsize(local)
        if entry.is_dir or entry.size != size:
            return True
        if entry.md5 is not None:
            h = hashlib.md5()
            with open(local, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            return h.digest() != entry.md5
        if size > COMPARE_LIMIT:
            return True
        with open(local, "rb") as f:
            return f.read() != (store.read(remote, 0, size) if size else b"")
    except (MountdError, OSError) as e:
        log.debug("could not compare %s with %s: %s", local, remote, e)
        return True


def upload(store: ObjectStore, pairs: Iterable[tuple[str, str]], overwrite: bool = False,
           workers: int = DEFAULT_WORKERS, show_progress: bool = True,
           empty_dirs: Iterable[str] = (), refused: Iterable[tuple[str, str]] = (),
           cancel: threading.Event | None = None, job: Job | None = None, label: str | None = None) -> TransferReport:
    """Upload (local path, remote path) pairs. Setting `cancel` stops files not
    yet started; they are reported as failed (not uploaded), never deleted.
    With a journal `job`, each file storage confirms is recorded in it, and the
    job is finished once all its files and directories are confirmed."""
    progress = Progress(TransferReport("uploaded"), enabled=show_progress, label=label)
    for local, reason in refused:
        progress.failed(local, reason)
        log.error("not uploading %s: %s", local, reason)

    def one(local: str, remote: str) -> None:
        if cancel is not None and cancel.is_set():
            progress.failed(local, "not uploaded: aborted")
            return
        try:
            progress.add_total(os.path.getsize(local))
            if upload_file(store, local, remote, overwrite, progress.bytes_moved) is not None:
                progress.file_done()
            else:
                progress.skipped(remote if differs(store, local, remote) else None)
            if job is not None:
                job.confirm(remote)
        except (MountdError, OSError) as e:
            reason = getattr(e, "strerror", None) or str(e)
            progress.failed(local, reason)
            log.error("upload of %s failed: %s", local, reason)
        except Exception as e:  # unexpected: this file fails, the others go on
            log.debug("upload of %s failed", local, exc_info=True)
            progress.failed(local, f"internal error: {type(e).__name__}: {e}")

    failed_before = len(progress.report.failed)
    try:
        with BoundedPool(workers, "upload") as pool:
            for local, remote in pairs:
                pool.submit(one, local, remote)
        for remote in empty_dirs:
            try:
                store.mkdir(remote)
                progress.report.directories += 1
            except MountdError as e:
                progress.failed(remote, str(e))
    finally:
        report = progress.close()
    if report.differing:
        log.warning("%d file(s) NOT uploaded: storage already holds a different version of %s (set overwrite, "
                    "or --overwrite, to replace them)", len(report.differing), report.first_differing())
    if job is not None and len(report.failed) == failed_before and not job.remaining():
        job.finish()
    return report


def upload_tree(store: ObjectStore, src_dir: str, target_path: str | None = None, overwrite: bool = False,
                workers: int = DEFAULT_WORKERS, show_progress: bool = True,
                cancel: threading.Event | None = None) -> TransferReport:
    files, empty_dirs, refused = plan_tree(src_dir, target_path)
    return upload(store, files, overwrite, workers, show_progress, empty_dirs, refused, cancel)


def plan_files(files: Iterable[str], relative_root: str | None, target_path: str | None) -> list[tuple[str, str]]:
    """The seed's upload_files: each file's remote name is its path relative to
    `relative_root` (default: their common directory) under target_path."""
    files = [os.path.abspath(f) for f in files]
    for f in files:
        if not os.path.isfile(f):
            raise UsageError(f"{f} is not a file")
    if not files:
        return []
    root = os.path.abspath(relative_root) if relative_root else os.path.commonpath(
        [os.path.dirname(f) for f in files])
    pairs = []
    for f in files:
        if not is_within(f, root):
            raise UsageError(f"{f} is not under relative_root {root}")
        rel = os.path.relpath(f, root)
        pairs.append((f, join(normalize_path(target_path), rel.replace(os.sep, "/"))))
    return pairs
