"""A mount worker: the process that holds one FUSE mount.

Started by `mountd mount` (or the run supervisor) with its job as JSON on
standard input, never on the command line (it may hold an inline secret).
It opens the store, mounts, and reports "ready" or "error CODE: ..." on the pipe
its starter waits on. With a supervisor pipe, it unmounts itself when the
supervisor goes away, so no mount outlives the process that wanted it; the
`auto_unmount` mount option covers the worker itself dying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict

from mountd.config import datastores
from mountd.config.settings import CacheSettings
from mountd.errors import EXIT_USAGE, MountdError, NotFound, UsageError
from mountd.locks import try_lock
from mountd import tuning
from mountd.run import control, runtime

log = logging.getLogger("mountd.worker")


def mount_work_root() -> str:
    """Where read-write mounts started by `mountd mount` keep their staged
    files and upload journals, one directory per datastore path."""
    base = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    if not base:
        from mountd.config.workspace import data_dir
        base = data_dir()
    return os.path.join(base, "mounts")


def default_work_dir(cfg: datastores.DatastoreConfig, path: str) -> str:
    key = hashlib.sha256(f"{cfg.location}\0{path}".encode()).hexdigest()[:16]
    return os.path.join(mount_work_root(), f"{cfg.name}-{key}")


def make_spec(cfg: datastores.DatastoreConfig, path: str, mountpoint: str, settings: CacheSettings,
              read_only: bool = True, allow_other: bool = False, work_dir: str | None = None,
              credential_source: dict | None = None, prefetch: bool = False) -> dict:
    """The job of one mount worker. A read-write mount stages writes and
    keeps its upload journal in `work_dir`; the journal names the datastore
    without secrets, an inline credential by the file it came from.
    `prefetch`: fill the disk cache with the whole path once live (read-only
    mounts with a disk cache)."""
    from mountd.journal import datastore_record
    spec = {"datastore": {"name": cfg.name, **cfg.to_dict()}, "path": path, "mountpoint": mountpoint,
            "settings": asdict(settings), "read_only": read_only, "allow_other": allow_other,
            "prefetch": prefetch}
    if not read_only:
        spec["work_dir"] = os.path.abspath(work_dir or default_work_dir(cfg, path))
        spec["journal_datastore"] = datastore_record(cfg, credential_source)
    return spec


class _DiskCacheDir:
    """The disk-tier directory for one store and path, locked while in use
    so two mounts never evict each other's files; a second concurrent mount
    of the same data gets a private directory, removed when it ends."""

    def __init__(self, base: str, identity: str):
        os.makedirs(base, mode=0o700, exist_ok=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.path = os.path.join(base, key)
        self.private = False
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        self._lock = try_lock(self.path)
        if self._lock is None:
            self.path = os.path.join(base, f"{key}-{os.getpid()}")
            self.private = True
            os.makedirs(self.path, mode=0o700, exist_ok=True)

    def close(self) -> None:
        if self.private:
            shutil.rmtree(self.path, ignore_errors=True)
        if self._lock:
            self._lock.close()


def run(spec: dict, on_ready, debug: bool = False) -> None:
    """Mount as `spec` says and serve until unmounted. Raises MountdError
    before the mount is live if anything is wrong."""
    from mountd.cache.blocks import BlockCache, DiskTier
    from mountd.fs.core import FileSystemCore
    from mountd.fs.fuse_ops import serve
    from mountd.fs.preload import FILL_BLOCKS, DatasetPrefetch
    from mountd.paths import normalize_path
    from mountd.storage import open_store

    cfg = datastores.parse(spec["datastore"]["name"],
                           {k: v for k, v in spec["datastore"].items() if k != "name"}, "mount")
    settings = CacheSettings(**spec["settings"])
    prefix = normalize_path(spec.get("path") or "")
    mountpoint = spec["mountpoint"]
    store = open_store(cfg)
    store.check()
    if prefix:
        try:
            entry = store.stat(prefix)
        except NotFound:
            if spec.get("read_only", True):
                raise UsageError(f"{prefix} does not exist in datastore {cfg.name}: check the path (or mount "
                                 "it --read-write to start an empty directory there)") from None
            # Outputs usually do not exist yet: a read-write mount of a new
            # directory starts empty (made as `mkdir` in the mount would).
            store.mkdir(prefix)
            entry = store.stat(prefix)
        if not entry.is_dir:
            raise MountdError(f"{prefix} in datastore {cfg.name} is a file, not a directory")
    cache_dir = disk = None
    if settings.disk:
        cache_dir = _DiskCacheDir(settings.directory, f"{cfg.location}\0{prefix}")
        disk = DiskTier(cache_dir.path, settings.max_size, settings.reserved_free)
    read_only = spec.get("read_only", True)
    writeback = None if read_only else _writeback(store, spec)
    want_prefetch = spec.get("prefetch", False) and read_only and disk is not None
    blocks = BlockCache(settings.memory, disk, settings.threads, settings.block_size,
                        fill_blocks=FILL_BLOCKS if want_prefetch else 0)
    core = FileSystemCore(store, settings, blocks, prefix=prefix, read_only=read_only, writeback=writeback)
    prefetch = DatasetPrefetch(core) if want_prefetch else None
    record = {"pid": os.getpid(), "mountpoint": mountpoint, "datastore": cfg.name, "path": prefix,
              "mode": "ro" if spec.get("read_only", True) else "rw", "location": cfg.location,
              "cache_dir": cache_dir.path if cache_dir else None, "log": runtime.log_path(mountpoint),
              "owner": spec.get("owner"), "started": time.time(), "work_dir": spec.get("work_dir"),
              "pid_start": runtime.process_start(os.getpid())}  # tells this worker from a later user of its pid
    server = None

    def status() -> dict:
        out = dict(record, **core.counters())
        if prefetch is not None:
            out["prefetch"] = prefetch.counters()
        return out

    def ready():
        nonlocal server
        # Runs inside FUSE's init, before the kernel lists the mount: the
        # thread waits for it in mountinfo. Never stat the mountpoint from
        # here: a worker killed while one of its threads waits on its own
        # mount cannot exit, and its dead mount stays.
        threading.Thread(target=_tune_readahead, args=(mountpoint,), daemon=True).start()
        try:
            server = control.ControlServer(runtime.control_path(mountpoint), status)
        except OSError as e:  # the mount works without it; only `mountd status` loses its numbers
            log.warning("no control socket for %s: %s", mountpoint, e)
        runtime.write_record(mountpoint, record)
        log.info("mounted %s:%s on %s (%s)", cfg.name, prefix or "/", mountpoint, record["mode"])
        on_ready()
        if prefetch is not None:  # in the background: the mount is live first, whatever the dataset's size
            prefetch.start()

    try:
        serve(core, mountpoint, fsname=f"mountd:{cfg.name}", read_only=spec.get("read_only", True),
              allow_other=spec.get("allow_other", False), on_ready=ready, debug=debug)
    finally:
        if prefetch is not None:
            prefetch.close()
        if server is not None:
            server.close()
        runtime.remove_record(mountpoint)
        if cache_dir:
            cache_dir.close()
        log.info("unmounted %s", mountpoint)


def _tune_readahead(mountpoint: str) -> None:
    from mountd.fs.fuse_ops import tune_kernel_readahead
    from mountd.run.mounts import mount_device
    real = os.path.join(os.path.realpath(os.path.dirname(mountpoint)), os.path.basename(mountpoint))
    for _ in range(100):
        device = mount_device(real)
        if device:
            tune_kernel_readahead(device)
            return
        time.sleep(0.05)


def _writeback(store, spec: dict):
    """The write path of a read-write mount, after finishing what an earlier
    mount of this work dir left unuploaded."""
    from mountd.fs.writeback import WriteBack, orphans
    from mountd.transfer.resume import resume

    work_dir = spec["work_dir"]
    os.makedirs(work_dir, mode=0o700, exist_ok=True)
    report = resume(work_dir)
    if report.jobs:
        (log.warning if report.failed else log.info)("%s: %s", work_dir, report.summary())
    left = orphans(work_dir)
    if left:
        log.warning("%d file(s) were open for writing when an earlier mount of %s ended and were never "
                    "closed; not uploaded, kept in %s", len(left), spec["mountpoint"], os.path.dirname(left[0]))
    return WriteBack(store, work_dir, spec["journal_datastore"], origin=f"mount {spec['mountpoint']}")


def _watch_supervisor(fd: int, mountpoint: str) -> None:
    """Block until the supervisor's end of the pipe closes, then unmount."""
    def watch():
        try:
            while os.read(fd, 1):
                pass
        except OSError:
            pass
        log.warning("supervisor went away: unmounting %s", mountpoint)
        subprocess.run(["fusermount3", "-u", "-z", mountpoint], capture_output=True)
    threading.Thread(target=watch, name="supervisor-watch", daemon=True).start()


def main() -> int:
    from mountd import logsetup

    spec = json.load(sys.stdin)
    logsetup.setup(spec.get("log_level", "info"), spec.get("debug", False), spec.get("log_format", "text"))
    from mountd.run import privileges
    privileges.drop()  # before any thread starts: threads inherit the reduced set
    tuning.return_freed_blocks()
    tuning.for_transfers()
    ready_fd = spec.get("ready_fd")

    def report(line: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, (line + "\n").encode())
                os.close(ready_fd)
            except OSError:
                pass

    if spec.get("supervisor_fd") is not None:
        _watch_supervisor(spec["supervisor_fd"], spec["mountpoint"])
    try:
        run(spec, lambda: report("ready"), debug=spec.get("debug", False))
    except MountdError as e:
        report(f"error {e.exit_code}: {e}")
        return e.exit_code
    except Exception as e:  # noqa: BLE001 - reported to the starter, then logged in full
        report(f"error 1: internal error: {type(e).__name__}: {e}")
        log.exception("mount worker failed")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main() or 0)


__all__ = ["make_spec", "run", "main", "EXIT_USAGE"]
