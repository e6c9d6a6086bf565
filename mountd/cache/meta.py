"""Metadata cache: what storage said about paths, trusted for a TTL.

A directory listing fills its children's attributes and remembers which
names exist, so `stat` of a sibling that is not there is answered without a
request (Python imports and data loaders probe many such names). Names known
absent are cached too, for a shorter time.
"""

from __future__ import annotations

import posixpath
import threading
from typing import Iterator, cast

from cachetools import TTLCache

from mountd.errors import NotFound
from mountd.storage.base import Entry, ObjectStore

MAX_ENTRIES = 500_000
MAX_LISTINGS = 20_000
# How long a change is remembered for the requests that were under way when
# it was made: longer than any listing or stat takes.
CHANGE_MEMORY = 600.0


class MetadataCache:
    def __init__(self, store: ObjectStore, ttl: float, negative_ttl: float):
        self.store = store
        self._lock = threading.Lock()
        self._entries: TTLCache = TTLCache(MAX_ENTRIES, ttl)  # path -> Entry
        self._absent: TTLCache = TTLCache(MAX_ENTRIES // 5, max(negative_ttl, 0.001))  # path -> True
        self._listings: TTLCache = TTLCache(MAX_LISTINGS, ttl)  # dir path -> frozenset of child names
        self.negative_enabled = negative_ttl > 0
        self.list_parents = True  # answer a stat by listing its directory
        self._dir_locks: TTLCache = TTLCache(MAX_LISTINGS, max(ttl, 1.0))  # dir path -> Lock
        self.requests = 0  # metadata calls that went to storage
        self._changes = 0  # how many changes this mount made so far
        self._changed: TTLCache = TTLCache(MAX_ENTRIES, CHANGE_MEMORY)  # path -> number of its last change
        self._changed_dirs: TTLCache = TTLCache(MAX_LISTINGS, CHANGE_MEMORY)  # dir -> last change of a child
        self._cleared = 0  # the number of the last clear()

    def stat(self, path: str) -> Entry:
        cached = self._cached(path)
        if cached is not None:
            return cached
        if path and self.list_parents:
            # Like a directory cache: one listing of the parent answers this
            # name and every sibling (a loader opening 2000 files of one
            # directory makes one request, not 2000), absent names included.
            parent = posixpath.dirname(path)
            with self._dir_lock(parent):
                if self._listing_fresh(parent) is None:
                    try:
                        for _ in self.list_dir(parent):
                            pass
                    except NotFound:
                        pass  # no such directory: ask for the path itself below
            cached = self._cached(path)
            if cached is not None:
                return cached
        started = self._now()
        try:
            self._count_request()
            entry = self.store.stat(path)
        except NotFound:
            if self.negative_enabled:
                with self._lock:
                    if self._unchanged_since(started, path):
                        self._absent[path] = True
            raise
        with self._lock:
            if self._unchanged_since(started, path):
                self._entries[path] = entry
        return entry

    def _now(self) -> int:
        with self._lock:
            return self._changes

    def _count_request(self) -> None:
        with self._lock:  # stat and list_dir are called from many FUSE threads
            self.requests += 1

    def _unchanged_since(self, started: int, path: str, changed=None) -> bool:
        """No change to `path` (a key of `changed`, by default the paths
        themselves) since change number `started`. Under self._lock."""
        return self._cleared <= started and (self._changed if changed is None else changed).get(path, 0) <= started

    def _note_change(self, path: str, *dirs: str) -> None:
        """Under self._lock: `path` changed here, and so did `dirs`' children."""
        self._changes += 1
        self._changed[path] = self._changes
        for d in dirs:
            self._changed_dirs[d] = self._changes

    def _cached(self, path: str) -> Entry | None:
        """The entry if known; NotFound if known absent; None if unknown."""
        with self._lock:
            entry = self._entries.get(path)
            if entry is not None:
                return entry
            if path in self._absent:
                raise NotFound(path)
            parent, name = posixpath.split(path)
            names = self._listings.get(parent) if path else None
            if names is not None and name not in names and self.negative_enabled:
                raise NotFound(path)
        return None

    def _listing_fresh(self, path: str):
        with self._lock:
            return self._listings.get(path)

    def _dir_lock(self, path: str) -> threading.Lock:
        with self._lock:
            lock = self._dir_locks.get(path)
            if lock is None:
                lock = self._dir_locks[path] = threading.Lock()
            return lock

    def list_dir(self, path: str) -> Iterator[Entry]:
        """The children of `path`, from the cache while its listing is fresh,
        else streamed from storage page by page while filling the cache."""
        with self._lock:
            names = self._listings.get(path)
            cached = None
            if names is not None:
                cached = [self._entries.get(posixpath.join(path, n) if path else n) for n in names]
                if any(e is None for e in cached):
                    cached = None  # some children expired on their own: list again
        if cached is not None:
            yield from cast(list[Entry], cached)  # none is None: checked above
            return
        self._count_request()
        started = self._now()
        seen = set()
        for entry in self.store.list_dir(path):
            with self._lock:
                if self._unchanged_since(started, entry.path):
                    self._entries[entry.path] = entry
                    self._absent.pop(entry.path, None)
                else:
                    # changed here since the listing was asked for: what
                    # this mount knows now is newer than the page
                    entry = self._entries.get(entry.path, entry)
            seen.add(entry.name)
            yield entry
        with self._lock:
            if self._unchanged_since(started, path, self._changed_dirs):
                self._listings[path] = frozenset(seen)

    def forget(self, path: str) -> None:
        """Drop what is known of `path` and its parent's listing (after a change)."""
        with self._lock:
            self._entries.pop(path, None)
            self._absent.pop(path, None)
            self._listings.pop(path, None)
            self._listings.pop(posixpath.dirname(path), None)
            self._note_change(path, path, posixpath.dirname(path))

    def clear(self) -> None:
        """Forget everything (after a change too wide to follow name by name)."""
        with self._lock:
            self._entries.clear()
            self._absent.clear()
            self._listings.clear()
            self._changes += 1
            self._cleared = self._changes

    def remember(self, entry: Entry) -> None:
        with self._lock:
            self._entries[entry.path] = entry
            self._absent.pop(entry.path, None)
            parent = posixpath.dirname(entry.path)
            names = self._listings.get(parent)
            if names is not None and entry.name not in names:
                self._listings[parent] = names | {entry.name}
            self._note_change(entry.path, parent)

    def __len__(self) -> int:
        return len(self._entries)
