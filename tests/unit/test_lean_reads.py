"""Ranged reads of the lean data path (mountd.storage.azure_http.RangeReader)
against a real socket server that cuts answers short: a broken stream
resumes where it broke, every piece reaches the sink once and whole, and a
read pinned to a version never uses another version's bytes."""

import os
import re

import pytest

from mountd.storage.azure_http import HttpError, RangeReader, Signer
from mountd.storage.retry import StoragePolicy
from tests.support.scripted_http import ScriptedServer

DATA = os.urandom(10_000)
FAST = StoragePolicy(retries=5, backoff=0.01, backoff_max=0.02, connect_timeout=2, read_timeout=2)


def ranged(server, cut_at=None, etag="v1"):
    """An answer to the last request's x-ms-range, cut after `cut_at`
    bytes of body (the connection closed), if given."""
    def answer(conn):
        lo, hi = map(int, re.search(r"x-ms-range: bytes=(\d+)-(\d+)", server.requests[-1]).groups())
        body = DATA[lo:hi + 1]
        head = (f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                f"Content-Range: bytes {lo}-{hi}/{len(DATA)}\r\nETag: \"{etag}\"\r\n\r\n").encode()
        conn.sendall(head + (body if cut_at is None else body[:cut_at]))
        return "close" if cut_at is not None else None
    return answer


@pytest.fixture
def reader_for():
    made = []

    def make(*answers, conditional=True):
        """A reader of a server answering with answers[i](server) to request i."""
        server = ScriptedServer([])
        server.answers.extend(make_answer(server) for make_answer in answers)
        reader = RangeReader(f"http://127.0.0.1:{server.port}/acct", Signer("acct"), conditional=conditional,
                             retry=FAST)
        made.append((server, reader))
        return server, reader
    yield make
    for server, reader in made:
        reader.close()
        server.close()


def test_a_broken_stream_resumes_and_delivers_each_piece_once(reader_for):
    server, reader = reader_for(lambda s: ranged(s, cut_at=3500), lambda s: ranged(s, cut_at=2000),
                                lambda s: ranged(s))
    pieces = []

    def sink(offset, piece):
        pieces.append((offset, bytes(piece)))
    got = reader.stream("c/blob", 0, len(DATA), "v1", memoryview(bytearray(1000)), sink)
    assert got == len(DATA)
    assert [o for o, _ in pieces] == list(range(0, 10_000, 1000))  # in order, none twice
    assert all(len(p) == 1000 for _, p in pieces) and b"".join(p for _, p in pieces) == DATA
    ranges = [re.search(r"x-ms-range: (\S+)", r).group(1) for r in server.requests]
    assert ranges == ["bytes=0-9999", "bytes=3500-9999", "bytes=5500-9999"]  # each resumed where it broke
    assert all("If-Match: v1" in r for r in server.requests)


def test_a_sink_may_keep_its_piece_and_hand_over_the_next_buffer(reader_for):
    _, reader = reader_for(lambda s: ranged(s, cut_at=2500), lambda s: ranged(s))
    kept, spare = [], [bytearray(1000) for _ in range(12)]

    def sink(offset, piece):
        kept.append((offset, piece))
        return memoryview(spare.pop())
    reader.stream("c/blob", 0, len(DATA), "v1", memoryview(bytearray(1000)), sink)
    assert b"".join(bytes(p) for _, p in kept) == DATA  # no piece was overwritten after it was handed on


def test_a_short_object_ends_the_stream_with_a_partial_last_piece(reader_for):
    _, reader = reader_for(lambda s: ranged(s))
    pieces = []
    got = reader.stream("c/blob", 9_500, 2_000, None, memoryview(bytearray(400)),
                        lambda o, p: pieces.append((o, bytes(p))))
    assert got == 500 and pieces == [(9_500, DATA[9_500:9_900]), (9_900, DATA[9_900:])]


def test_read_into_resumes_into_the_same_buffer(reader_for):
    _, reader = reader_for(lambda s: ranged(s, cut_at=777), lambda s: ranged(s))
    view = memoryview(bytearray(4000))
    assert reader.read_into("c/blob", 100, view, "v1") == 4000 and bytes(view) == DATA[100:4100]


def test_unconditional_reads_refuse_another_version_before_using_its_body(reader_for):
    # the File service takes no If-Match: the etag of each answer is compared instead
    _, reader = reader_for(lambda s: ranged(s, etag="v2"), conditional=False)
    view = memoryview(bytearray(100))
    with pytest.raises(HttpError) as e:
        reader.read_into("share/file", 0, view, "v1")
    assert e.value.status == 412 and bytes(view) == bytes(100)


def test_a_resumed_read_stays_on_the_version_it_started_with(reader_for):
    # first answer v1 cut short; the resumed one is of a newer version
    server, reader = reader_for(lambda s: ranged(s, cut_at=1000, etag="v1"), lambda s: ranged(s, etag="v2"),
                                conditional=False)
    with pytest.raises(HttpError) as e:
        reader.read_into("share/file", 0, memoryview(bytearray(5000)), None)
    assert e.value.status == 412
