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
        hi = min(hi, len(DATA) - 1)  # as Azure answers a range that runs past the end
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


def whole(server):
    """An answer that ignores the range: 200 and the whole object."""
    def answer(conn):
        conn.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {len(DATA)}\r\nETag: \"v1\"\r\n\r\n".encode() + DATA)
    return answer


def shifted(server, by=1):
    """A 206 whose Content-Range starts `by` bytes after what was asked."""
    def answer(conn):
        lo, hi = map(int, re.search(r"x-ms-range: bytes=(\d+)-(\d+)", server.requests[-1]).groups())
        lo += by
        body = DATA[lo:hi + 1]
        conn.sendall((f"HTTP/1.1 206 Partial Content\r\nContent-Length: {len(body)}\r\n"
                      f"Content-Range: bytes {lo}-{hi}/{len(DATA)}\r\n\r\n").encode() + body)
    return answer


def test_a_200_to_a_range_not_at_the_start_is_never_taken_for_the_range(reader_for):
    server, reader = reader_for(*[whole] * 6)
    view = memoryview(bytearray(100))
    with pytest.raises(HttpError, match="200") as e:
        reader.read_into("c/blob", 5_000, view, None)
    assert e.value.code == "RangeMismatch" and bytes(view) == bytes(100)
    assert len(server.requests) == FAST.retries + 1  # retried, then failed


def test_a_200_to_a_range_from_the_start_is_the_objects_first_bytes(reader_for):
    server, reader = reader_for(whole, lambda s: ranged(s))
    view = memoryview(bytearray(100))
    assert reader.read_into("c/blob", 0, view, None) == 100 and bytes(view) == DATA[:100]
    view = memoryview(bytearray(50))  # the rest of the whole body was not left on the connection
    assert reader.read_into("c/blob", 200, view, None) == 50 and bytes(view) == DATA[200:250]


def test_a_content_range_that_starts_elsewhere_is_retried_then_fails(reader_for):
    server, reader = reader_for(shifted, lambda s: ranged(s))
    view = memoryview(bytearray(1000))
    assert reader.read_into("c/blob", 1000, view, None) == 1000 and bytes(view) == DATA[1000:2000]
    assert len(server.requests) == 2
    server, reader = reader_for(*[shifted] * 6)
    with pytest.raises(HttpError, match="bytes 1001-1999 came for bytes 1000-1999"):
        reader.read_into("c/blob", 1000, memoryview(bytearray(1000)), None)


def test_an_interim_answer_before_the_range_is_skipped(reader_for):
    def early_hints(server):
        inner = ranged(server)

        def answer(conn):
            conn.sendall(b"HTTP/1.1 103 Early Hints\r\nLink: </c/other>; rel=preload\r\n\r\n")
            inner(conn)
        return answer
    server, reader = reader_for(early_hints, lambda s: ranged(s))
    view = memoryview(bytearray(300))
    assert reader.read_into("c/blob", 0, view, None) == 300 and bytes(view) == DATA[:300]
    assert reader.read_into("c/blob", 300, view, None) == 300 and bytes(view) == DATA[300:600]
    assert len(server.requests) == 2


def test_requests_carry_version_date_user_agent_and_one_request_id_across_retries(reader_for):
    server, reader = reader_for(lambda s: ranged(s, cut_at=10), lambda s: ranged(s))
    reader.read_into("c/blob", 0, memoryview(bytearray(100)), None)
    ids = [re.search(r"x-ms-client-request-id: (\S+)", r)[1] for r in server.requests]
    assert len(ids) == 2 and ids[0] == ids[1]
    for request in server.requests:
        assert "x-ms-version: 2025-11-05" in request and "x-ms-date: " in request
        assert re.search(r"User-Agent: mountd/\S+ ", request)


def test_request_ids_are_unique_uuid_shaped_and_differ_in_a_forked_child():
    import time as _time
    from email.utils import parsedate_to_datetime
    from mountd.storage.azure_http import http_date, new_request_id
    ids = [new_request_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", i) for i in ids[:100])
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: a process of its own must not repeat the parent's ids
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read), os.close(write)
    assert child[:19] != ids[0][:19] and child not in ids
    assert abs(parsedate_to_datetime(http_date()).timestamp() - _time.time()) < 2


def test_retry_after_as_seconds_date_and_milliseconds():
    from email.utils import formatdate
    import time as _time
    from mountd.storage.retry import retry_after
    assert retry_after({"Retry-After": "3"}) == 3.0
    assert 8 <= retry_after({"Retry-After": formatdate(_time.time() + 10, usegmt=True)}) <= 10
    assert retry_after({"Retry-After": formatdate(_time.time() - 10, usegmt=True)}) == 0.0
    assert retry_after({"x-ms-retry-after-ms": "1500", "Retry-After": "9"}) == 1.5
    assert retry_after({"Retry-After": "soon"}) is None and retry_after({}) is None
    assert retry_after({"Retry-After": "100000"}) == 60.0
