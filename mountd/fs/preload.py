"""Dataset prefetch (`mountd mount --prefetch`, `prefetch: true`): once a
read-only mount is live, a background streamer fills the disk cache with
every file under the mounted path, in listing order, so that a job's first
epoch finds its files cached and its later ones never wait on storage.

It moves bytes as `mountd download` does (the same bounded pool of 16
requests in flight: small files in one request each, large ones as their
blocks, each a ranged read, in parallel) through the block cache's own fetch
path, so the blocks it stores are the ones reads look up: keyed by path,
etag and index. It lists directory by directory through the mount's
metadata cache, not with a flat listing of its own: the job's lookups
answer from the same listings, so each directory is listed once for both
(a flat walk besides cost Azurite 0.14 s of CPU per 1000 files, on top of
the 0.33 s of the 50 directory listings the lookups made anyway). A file changed in storage after it was
prefetched has a new etag at its next open, so its old blocks are never
served (they age out).

The job comes first. A read never queues behind the prefetch: the
prefetch starts a request only while the requests readers have in flight
and its own stay under the budget (`BlockCache.fill`), and a reader wanting
a block the prefetch is fetching waits for that fetch rather than making a
second one (if it fails, the reader fetches the block itself). The
prefetch stores only into free room within the disk cache's cap and
reserve, never evicting: a dataset larger than the cache is prefetched up
to the cap and the rest is left to on-demand reads, said in one log line.
Storage faults are retried by the storage layer; a file that still fails is
left to on-demand reads, and a run of such failures stops the prefetch.

blobfuse2 2.5's `--preload` (file-cache mode, a preview) also downloads a
container or a directory into its local cache when it mounts. Here, in
addition: reads jump the queue, the cache's cap and reserve hold (and what
was prefetched is not evicted before it is read), progress is in `mountd
status` and the metrics, and etag pinning holds for what was prefetched.
(mountpoint-s3's prefetcher, by contrast, reads ahead within one file being
read sequentially, as `cache/prefetch.py` does here.)
"""

from __future__ import annotations

import logging
import threading
import time
from itertools import chain, islice
from typing import Iterator

from mountd.errors import MountdError, NotFound, Stale
from mountd.storage.base import Entry
from mountd.transfer.download import DEFAULT_WORKERS
from mountd.transfer.pool import BoundedPool
from mountd.transfer.progress import human_size

log = logging.getLogger(__name__)

FILL_BLOCKS = 4  # full-size blocks being prefetched at once: the memory the block cache sets aside for them
FAILURES_TO_STOP = 5  # blocks failing one after another (after the storage layer's retries): storage is down
# Entries of one directory listed before the first of them is fetched: the
# metadata cache keeps a listing for lookups only once it has been read to
# its end, and a listing read while its files are fetched would end seconds
# later, every lookup in the directory meanwhile listing it again. Larger
# directories go on streaming past this (bounded memory).
LISTED_AHEAD = 20_000


class _File:
    """A file whose blocks are being prefetched."""

    __slots__ = ("entry", "left", "ok", "fetched")

    def __init__(self, entry: Entry, blocks: int):
        self.entry, self.left = entry, blocks
        self.ok = True  # every block so far stored or found cached
        self.fetched = False  # some block came from storage (else the file was cached already)


class DatasetPrefetch:
    """Fills `core`'s disk tier with everything under its prefix, in the
    background; `counters()` for `mountd status`."""

    def __init__(self, core, workers: int = DEFAULT_WORKERS):
        self.core = core
        self.workers = workers
        self._big = threading.Semaphore(FILL_BLOCKS)
        self._lock = threading.Lock()
        self._stop: str | None = None  # why the prefetch stopped fetching
        self._closed = False
        self._failures = 0  # files failed in a row
        self.state = "listing"
        self.files_listed = self.files_done = self.files_cached = self.files_failed = 0
        self.bytes_listed = self.bytes_done = self.bytes_fetched = 0
        self.started = self.finished = 0.0
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="dataset-prefetch", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """At unmount: stop fetching (a fetch under way ends with its request)."""
        self._closed = True
        self._stopping("the mount ended")

    def _stopping(self, why: str) -> None:
        with self._lock:
            self._stop = self._stop or why

    # -- the walk --------------------------------------------------------------------------
    def _run(self) -> None:
        core = self.core
        root = core.prefix
        try:
            with BoundedPool(self.workers, "prefetch") as pool:
                for entry in self._walk(root):
                    if self._closed:
                        break
                    with self._lock:
                        self.files_listed += 1
                        self.bytes_listed += entry.size
                    if self._stop is None:  # once stopped, the walk only counts what is left
                        self._plan(entry, pool)
                self.state = "prefetching"  # listed: the pool finishes what is queued
        except (MountdError, OSError) as e:
            self._stopping(f"cannot list {root or '/'}: {e}")
        except Exception as e:  # noqa: BLE001 - a prefetch must never take the mount down
            log.exception("dataset prefetch failed")
            self._stopping(f"internal error: {type(e).__name__}")
        self.finished = time.monotonic()
        self.state = "stopped" if self._stop else "done"
        self._report()

    def _walk(self, top: str) -> Iterator[Entry]:
        """Every file under `top`, depth first in listing order, each
        directory listed through the metadata cache (so the job's lookups
        find the listing there); its subdirectories after its files."""
        dirs = [top]
        while dirs:
            path = dirs.pop()
            children = iter(self.core.meta.list_dir(path))
            try:
                listed = list(islice(children, LISTED_AHEAD))
            except NotFound:
                if path == top:
                    raise
                continue  # removed since its parent was listed: nothing to prefetch there
            below = []
            for entry in chain(listed, children):  # past LISTED_AHEAD, the rest as it comes
                if self._closed:
                    return
                if entry.is_dir:
                    below.append(entry.path)
                else:
                    yield entry
            dirs.extend(reversed(below))  # popped in listing order

    def _plan(self, entry: Entry, pool: BoundedPool) -> None:
        """Runs on the listing thread: one task per block (a small file is
        one block), so a large file's blocks come down in parallel."""
        bs = self.core.settings.block_size
        blocks = max(1, -(-entry.size // bs))
        if entry.size == 0:
            self._file_done(_File(entry, 0))
            return
        f = _File(entry, blocks)
        for i in range(blocks):
            pool.submit(self._block, f, i)

    def _block(self, f: _File, index: int) -> None:
        if self._stop is not None:
            return
        key, length, fetch = self.core.block_fetch(f.entry, index)
        full = length == self.core.settings.block_size
        try:
            if full:
                self._big.acquire()  # a full block's buffer comes out of the memory set aside for the prefetch
            try:
                outcome = self.core.blocks.fill(key, length, fetch, self.workers, self.core.settings.threads)
            finally:
                if full:
                    self._big.release()
        except (Stale, NotFound):
            outcome = "changed"  # changed or deleted since the listing: its next open sees the new version
        except (MountdError, OSError) as e:
            outcome = "failed"
            log.debug("prefetch of %s block %d failed: %s", f.entry.path, index, e)
            with self._lock:
                self._failures += 1
                if self._failures >= FAILURES_TO_STOP:
                    self._stop = self._stop or f"storage failed {self._failures} times in a row (last: {e})"
        if outcome == "full":
            self._stopping("the disk cache is full")
        with self._lock:
            if outcome == "stored":
                self.bytes_fetched += length
                self._failures = 0
                f.fetched = True
            f.ok = f.ok and outcome in ("stored", "cached")
            f.left -= 1
            last = f.left == 0
        if last:
            self._file_done(f)

    def _file_done(self, f: _File) -> None:
        with self._lock:
            if f.ok:
                self.files_done += 1
                self.bytes_done += f.entry.size
                self.files_cached += not f.fetched
            else:
                self.files_failed += 1

    # -- reporting ------------------------------------------------------------------------
    def _report(self) -> None:
        took = self.finished - self.started
        summary = (f"prefetched {self.files_done} of {self.files_listed} files "
                   f"({human_size(self.bytes_done)} of {human_size(self.bytes_listed)}, "
                   f"{human_size(self.bytes_fetched)} from storage in {took:.1f} s)")
        if self._stop is None:
            log.info("dataset prefetch done: %s", summary)
        elif self._stop == "the disk cache is full":
            log.warning("dataset larger than the cache: %s; the rest is read on demand", summary)
        elif not self._closed:
            log.warning("dataset prefetch stopped, %s: %s; the rest is read on demand", self._stop, summary)

    def counters(self) -> dict:
        """Progress for `mountd status` (read without locks: plain ints)."""
        now = self.finished or time.monotonic()
        elapsed = max(now - self.started, 1e-3) if self.started else 0.0
        rate = self.bytes_fetched / elapsed if elapsed else 0.0
        left = self.bytes_listed - self.bytes_done
        eta = None
        if self.state == "prefetching" and rate > 0:
            eta = round(left / rate, 1)
        elif self.state in ("done", "stopped"):
            eta = 0.0
        return {"state": self.state, "stopped": self._stop, "files": self.files_done,
                "files_listed": self.files_listed, "files_cached": self.files_cached,
                "files_failed": self.files_failed, "bytes": self.bytes_done, "bytes_listed": self.bytes_listed,
                "bytes_from_storage": self.bytes_fetched, "rate": round(rate), "eta": eta}
