"""An open directory's entries, handed out over many readdir calls.

The kernel reads a directory a buffer at a time: each call takes the
entries that fit and names the offset of the last one it kept; the next call
starts after it. Entry k (counting from 1) carries offset k. The listing is
streamed from its source as the calls come, so a directory of 100 000 blobs
is never held here whole: only the entries handed out in the last call and
not yet confirmed by the next. A call that goes back (rewinddir) starts the
source again.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Iterator


class DirListing:
    def __init__(self, source: Callable[[], Iterable[tuple]]):
        self._source = source  # () -> iterable of entries, in a stable order
        self._it: Iterator | None = None
        self._produced = 0  # offset of the last entry taken from the source
        self._offered: deque = deque()  # (offset, entry) handed out, not yet confirmed

    def after(self, offset: int) -> Iterator[tuple]:
        """(offset, entry) for every entry after `offset`."""
        while self._offered and self._offered[0][0] <= offset:
            self._offered.popleft()  # the kernel kept these
        first = self._offered[0][0] if self._offered else self._produced + 1
        if self._it is None or offset < first - 1:
            self._it, self._produced, self._offered = iter(self._source()), 0, deque()
        for item in list(self._offered):
            yield item
        for entry in self._it:
            self._produced += 1
            if self._produced <= offset:
                continue  # a call that skips ahead (seekdir)
            item = (self._produced, entry)
            self._offered.append(item)
            yield item
