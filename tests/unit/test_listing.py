"""An open directory handed out over readdir calls (mountd.fs.listing):
each call takes what fits, the next goes on after the last entry kept,
and the source is streamed, restarted only by a call that goes back."""

from mountd.fs.listing import DirListing


class Source:
    """Entries e0..e(n-1); counts how often the listing was started."""

    def __init__(self, n):
        self.n, self.starts, self.taken = n, 0, 0

    def __call__(self):
        self.starts += 1
        for i in range(self.n):
            self.taken += 1
            yield f"e{i}"


def take(listing, offset, room):
    """One readdir call with room for `room` entries: what the kernel keeps."""
    kept = []
    for off, entry in listing.after(offset):
        if len(kept) == room:
            break  # the entry that did not fit is offered again next time
        kept.append((off, entry))
    return kept


def test_calls_go_on_where_the_last_one_stopped():
    source = Source(10)
    listing = DirListing(source)
    got, offset = [], 0
    while chunk := take(listing, offset, 3):
        got += chunk
        offset = chunk[-1][0]
    assert [e for _, e in got] == [f"e{i}" for i in range(10)]
    assert [o for o, _ in got] == list(range(1, 11))
    assert source.starts == 1 and source.taken == 10  # streamed once, each entry taken once


def test_an_entry_that_did_not_fit_is_offered_again():
    listing = DirListing(Source(5))
    assert take(listing, 0, 2) == [(1, "e0"), (2, "e1")]
    # the kernel kept only the first one
    assert take(listing, 1, 2) == [(2, "e1"), (3, "e2")]


def test_going_back_starts_the_source_again():
    source = Source(6)
    listing = DirListing(source)
    take(listing, 0, 4)
    take(listing, 4, 4)
    assert take(listing, 0, 2) == [(1, "e0"), (2, "e1")]  # rewinddir
    assert source.starts == 2


def test_a_call_may_skip_ahead():
    listing = DirListing(Source(10))
    assert take(listing, 7, 5) == [(8, "e7"), (9, "e8"), (10, "e9")]


def test_only_the_last_call_is_held():
    listing = DirListing(Source(100_000))
    offset = 0
    for _ in range(50):
        offset = take(listing, offset, 100)[-1][0]
    assert len(listing._offered) <= 101
