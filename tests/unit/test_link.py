"""The ranged reads' own request writer and answer reader
(mountd.storage.wire.Link and Reply, through Transport.get) against a real
socket server: answers arriving a byte at a time, heads larger than the
receive buffer, connection reuse and when a connection must not be reused,
and the answers it leaves to http.client."""

import socket
import time

import pytest

from mountd.storage import transport as tp
from mountd.storage import wire
from tests.unit.test_transport import ok, read_all, serve  # noqa: F401  # serve: the fixture


def get(server, t, headers=None):
    return t.get(server.url + "/blob", headers if headers is not None else {"x-ms-version": "v"})


def next_answer(server, t, body: bytes, connections: int) -> None:
    """The next request on `t` reads `body`, and by then the server has
    seen `connections` connections (1: the first one was reused)."""
    r = get(server, t)
    assert read_all(r) == body
    tp.release(r)
    assert server.connections == connections


def byte_by_byte(data: bytes):
    def answer(conn):
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(0.0005)  # each byte its own segment: the reader sees them one receive at a time
    return answer


def test_an_answer_arriving_a_byte_at_a_time(serve):
    answer = b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + ok(b"slowly, whole", "ETag: \"e\"\r\n")
    server = serve(byte_by_byte(answer), ok(b"next"))
    t = server.transport()
    r = get(server, t)
    assert type(r) is wire.Reply  # read by the lean reader, not handed to http.client
    assert r.status == 200 and r.headers["etag"] == '"e"' and read_all(r, piece=3) == b"slowly, whole"
    tp.release(r)
    next_answer(server, t, b"next", 1)


def test_a_bare_lf_head_arriving_a_byte_at_a_time_is_not_waited_on(serve):
    # http.client ends this head at the empty LF line; the reader must see
    # that too, not wait for a CRLF CRLF that never comes
    server = serve(byte_by_byte(b"HTTP/1.1 200 OK\nContent-Length: 3\n\nabc"))
    t = server.transport(read_timeout=3)
    started = time.monotonic()
    r = get(server, t)
    assert r.status == 200 and read_all(r) == b"abc"
    assert time.monotonic() - started < 2


@pytest.mark.parametrize("fields, lean", [(40, True), (98, False)])
def test_a_head_larger_than_the_receive_buffer(serve, fields, lean):
    # 40 x 700 bytes: more than one receive buffer, read by the lean reader;
    # 98 x 700: past its limit, read by http.client (98 and Content-Length: as
    # many fields as it takes)
    extra = "".join(f"X-Big-{i}: {'v' * 686}\r\n" for i in range(fields))
    server = serve(ok(b"after a big head", extra), ok(b"next"))
    t = server.transport()
    r = get(server, t)
    assert (type(r) is wire.Reply) is lean
    assert r.headers["x-big-7"] == "v" * 686 and len(r.headers) == fields + 1
    assert read_all(r) == b"after a big head"
    tp.release(r)
    next_answer(server, t, b"next", 1)


def test_a_connection_is_reused_after_bodies_read_to_the_end(serve):
    bodies = [b"a" * 10, b"", b"b" * 40_000, b"c"]  # in the buffer, empty, mostly straight from the socket
    server = serve(*[ok(b) for b in bodies])
    t = server.transport()
    for body in bodies:
        r = get(server, t)
        assert type(r) is wire.Reply and read_all(r, piece=4096) == body and r.isclosed()
        tp.release(r)
    assert server.connections == 1


def test_connection_close_answers_are_not_followed_on_that_connection(serve):
    # the server keeps the connection open after saying it closes it: the
    # client must still not send on it again
    server = serve(ok(b"bye", "Connection: close\r\n"), ok(b"fresh"))
    t = server.transport()
    r = get(server, t)
    assert type(r) is wire.Reply and r.will_close and read_all(r) == b"bye"
    tp.release(r)
    next_answer(server, t, b"fresh", 2)


@pytest.mark.parametrize("read", [0, 5, 50_000])
def test_a_body_not_read_to_the_end_closes_its_connection(serve, read):
    server = serve(ok(b"x" * 100_000), ok(b"after"))
    t = server.transport()
    r = get(server, t)
    if read:
        assert len(r.read(read)) == read
    tp.release(r)  # the rest of the body is buffered or still on the wire
    next_answer(server, t, b"after", 2)


def test_bytes_past_the_end_of_a_body_are_never_taken_for_the_next_answer(serve):
    stray = ok(b"stale bytes")
    server = serve(ok(b"first") + stray, ok(b"second"))
    t = server.transport()
    r = get(server, t)
    assert read_all(r) == b"first"
    tp.release(r)
    next_answer(server, t, b"second", 2)


def test_chunked_and_close_framed_answers_are_read_by_http_client(serve):
    def until_close(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nto the end")
        return "close"
    server = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
                   ok(b"lean"), until_close, ok(b"again"))
    t = server.transport()
    r = get(server, t)
    assert type(r) is wire.Answer and read_all(r) == b"abc"
    tp.release(r)
    r = get(server, t)
    assert type(r) is wire.Reply and read_all(r) == b"lean"  # after http.client, the same connection
    tp.release(r)
    r = get(server, t)
    assert read_all(r) == b"to the end"
    tp.release(r)
    assert read_all(get(server, t)) == b"again"
    assert server.connections == 2


@pytest.mark.parametrize("name, value", [("x-ms-meta-a", "v\r\nInjected: 1"), ("x-ms-meta-a", "v\nx"),
                                         ("x-ms-meta-a", "v\rx"), ("bad\r\nname", "v"), ("with space", "v")])
def test_a_header_that_would_break_the_request_is_refused_before_sending(serve, name, value):
    server = serve(ok(b"x"))
    t = server.transport()
    with pytest.raises(ValueError):
        get(server, t, {name: value})
    r = get(server, t)
    assert read_all(r) == b"x"
    assert len(server.requests) == 1 and "Injected" not in server.requests[0]


def test_the_request_head_is_what_http_client_wrote(serve):
    server = serve(ok(b"x"))
    t = server.transport()
    tp.release(get(server, t, {"x-ms-version": "v", "x-ms-range": "bytes=0-9"}))
    assert server.requests[0] == (f"GET /blob HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\n"
                                  f"User-Agent: {tp.USER_AGENT}\r\nx-ms-version: v\r\nx-ms-range: bytes=0-9")


def test_as_many_fields_as_http_client_takes_and_no_more(serve):
    server = serve(ok(b"99", "".join(f"F{i}: v\r\n" for i in range(98))),
                   ok(b"100", "".join(f"F{i}: v\r\n" for i in range(99))))
    t = server.transport()
    r = get(server, t)
    assert type(r) is wire.Reply and len(r.headers) == 99 and read_all(r) == b"99"
    tp.release(r)
    with pytest.raises(tp.TransportError, match="more than 100 headers"):
        get(server, t)


def test_a_head_that_starts_late_in_the_buffer_and_runs_past_its_end(serve):
    # a large interim answer fills most of the receive buffer; the final
    # head after it crosses the buffer's end and is moved to its start
    hints = b"HTTP/1.1 103 Early Hints\r\nLink: " + b"<x>," * 2500 + b"\r\n\r\n"
    extra = "".join(f"X-F{i}: {'w' * 190}\r\n" for i in range(40))
    server = serve(hints + ok(b"whole", extra), ok(b"next"))
    t = server.transport()
    r = get(server, t)
    assert type(r) is wire.Reply and r.headers["x-f39"] == "w" * 190 and read_all(r) == b"whole"
    tp.release(r)
    next_answer(server, t, b"next", 1)
