"""The data path's HTTP/1.1 client (mountd.storage.http1) against a real
socket server that answers what each test scripts: body framings,
connection reuse and its failures, broken and hostile answers."""

import socket
import time

import pytest

from mountd.storage.http1 import ConnectionPool, ProtocolError
from tests.support.scripted_http import ScriptedServer


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def read_all(response, piece=7):
    out = bytearray()
    buf = memoryview(bytearray(piece))
    while n := response.readinto(buf):
        out += buf[:n]
    return bytes(out)


@pytest.fixture
def serve():
    servers = []

    def start(*answers):
        s = ScriptedServer(answers)
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def test_length_framed_bodies_on_one_kept_alive_connection(serve):
    server = serve(ok(b"hello world"), ok(b"second"))
    pool = server.pool()
    r = pool.request("GET", "/a", {"x-ms-version": "v"})
    assert r.status == 200 and r.headers["content-length"] == "11" and read_all(r) == b"hello world"
    r.release()
    r = pool.request("GET", "/b", {})
    assert read_all(r) == b"second"
    r.release()
    assert server.connections == 1
    assert server.requests[0].startswith("GET /a HTTP/1.1\r\nHost: 127.0.0.1:") and "x-ms-version: v" in server.requests[0]


def test_chunked_body(serve):
    body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
    server = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, ok(b"next"))
    pool = server.pool()
    r = pool.request("GET", "/", {})
    assert read_all(r, piece=3) == b"hello, world"
    r.release()
    r = pool.request("GET", "/", {})  # the connection was left at the right place
    assert read_all(r) == b"next"
    r.release()
    assert server.connections == 1


def test_body_until_the_server_closes(serve):
    def answer(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        return "close"
    server = serve(answer, ok(b"fresh"))
    pool = server.pool()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"until the end"
    r.release()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"fresh"
    r.release()
    assert server.connections == 2  # a body framed by the close is never followed on that connection


def test_connection_close_is_honoured(serve):
    server = serve(ok(b"a", "Connection: close\r\n"), ok(b"b"))
    pool = server.pool()
    for want in (b"a", b"b"):
        r = pool.request("GET", "/", {})
        assert read_all(r) == want
        r.release()
    assert server.connections == 2


def test_a_kept_alive_connection_closed_by_the_server_is_replaced(serve):
    def answer_then_close(conn):
        conn.sendall(ok(b"first"))
        return "close"  # no Connection: close header: the client cannot know
    server = serve(answer_then_close, ok(b"second"))
    pool = server.pool()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"first"
    r.release()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"second"
    r.release()
    assert server.connections == 2


def test_an_unread_body_is_not_reused(serve):
    server = serve(ok(b"x" * 100_000), ok(b"after"))
    pool = server.pool()
    r = pool.request("GET", "/", {})
    r.readinto(memoryview(bytearray(10)))
    r.release()  # the rest of the body is still on the wire: closed, not pooled
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"after"
    assert server.connections == 2


def test_drain_keeps_the_connection(serve):
    server = serve(b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\nRetry-After: 1\r\n\r\nbusy!", ok(b"ok"))
    pool = server.pool()
    r = pool.request("GET", "/", {})
    assert r.status == 503 and r.headers["retry-after"] == "1"
    r.drain()
    r.release()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"ok"
    assert server.connections == 1


def test_head_has_no_body(serve):
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n", ok(b"next"))
    pool = server.pool()
    r = pool.request("HEAD", "/", {})
    assert r.status == 200 and r.headers["etag"] == '"e"' and r.readinto(memoryview(bytearray(10))) == 0
    r.release()
    r = pool.request("GET", "/", {})
    assert read_all(r) == b"next"


def test_a_body_cut_short_raises(serve):
    def cut(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        return "close"
    server = serve(cut)
    r = server.pool().request("GET", "/", {})
    with pytest.raises(ProtocolError):
        read_all(r)


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n",
                                     b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n"])
def test_not_http_is_a_protocol_error(serve, garbage):
    server = serve(garbage)
    with pytest.raises(ProtocolError):
        server.pool().request("GET", "/", {})


def test_no_answer_within_the_read_timeout(serve):
    server = serve(lambda conn: time.sleep(2))  # reads the request, answers nothing for a while
    with pytest.raises(TimeoutError):
        server.pool(read_timeout=0.3).request("GET", "/", {})


def test_nothing_listening_is_an_oserror():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(OSError):
        ConnectionPool(f"http://127.0.0.1:{port}", 2, 1.0, 1.0).request("GET", "/", {})


def test_interim_100_continue_is_skipped(serve):
    server = serve(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real"))
    r = server.pool().request("GET", "/", {})
    assert r.status == 200 and read_all(r) == b"real"
