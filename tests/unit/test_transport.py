"""The storage transport (mountd.storage.transport) against a real socket
server that answers what each test scripts: body framings, connection reuse
and its failures, interim answers, idle expiry, keep-alive, broken and
hostile answers; and what it reads from the environment (trust, proxies)."""

import os
import socket
import time

import pytest

from mountd.errors import ConfigError
from mountd.storage import network, wire
from mountd.storage import transport as tp
from tests.support.scripted_http import ScriptedServer


def ok(body: bytes, extra: str = "") -> bytes:
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def read_all(response, piece=7):
    body = tp.body_reader(response)
    out = bytearray()
    buf = memoryview(bytearray(piece))
    while n := body.readinto(buf):
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


def get(server, t=None, method="GET", path="/"):
    """A request as the data path sends it: a GET by Transport.get (the
    ranged reads' way), anything else by Transport.request."""
    t = t or server.transport()
    if method == "GET":
        return t.get(server.url + path, {"x-ms-version": "v"})
    return t.request(method, server.url + path, {"x-ms-version": "v"}, preload=False)


def test_length_framed_bodies_on_one_kept_alive_connection(serve):
    server = serve(ok(b"hello world"), ok(b"second"))
    t = server.transport()
    r = get(server, t, path="/a")
    assert r.status == 200 and r.headers["content-length"] == "11" and read_all(r) == b"hello world"
    tp.release(r)
    r = get(server, t, path="/b")
    assert read_all(r) == b"second"
    tp.release(r)
    assert server.connections == 1
    first = server.requests[0]
    assert first.startswith("GET /a HTTP/1.1\r\n") and "x-ms-version: v" in first
    assert f"User-Agent: {tp.USER_AGENT}" in first and tp.USER_AGENT.startswith("mountd/")


def test_chunked_body(serve):
    body = b"5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nTrailer: x\r\n\r\n"
    server = serve(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body, ok(b"next"))
    t = server.transport()
    r = get(server, t)
    assert read_all(r, piece=3) == b"hello, world"
    tp.release(r)
    r = get(server, t)  # the connection was left at the right place
    assert read_all(r) == b"next"
    tp.release(r)
    assert server.connections == 1


def test_body_until_the_server_closes(serve):
    def answer(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\nuntil the end")
        return "close"
    server = serve(answer, ok(b"fresh"))
    t = server.transport()
    r = get(server, t)
    assert read_all(r) == b"until the end"
    tp.release(r)
    r = get(server, t)
    assert read_all(r) == b"fresh"
    tp.release(r)
    assert server.connections == 2  # a body framed by the close is never followed on that connection


def test_a_kept_alive_connection_closed_by_the_server_is_replaced(serve):
    def answer_then_close(conn):
        conn.sendall(ok(b"first"))
        return "close"  # no Connection: close header: the client cannot know
    server = serve(answer_then_close, ok(b"second"))
    t = server.transport()
    r = get(server, t)
    assert read_all(r) == b"first"
    tp.release(r)
    time.sleep(0.1)
    r = get(server, t)
    assert read_all(r) == b"second"
    tp.release(r)
    assert server.connections == 2


def test_an_unread_body_is_not_reused(serve):
    server = serve(ok(b"x" * 100_000), ok(b"after"))
    t = server.transport()
    r = get(server, t)
    tp.body_reader(r).readinto(memoryview(bytearray(10)))
    tp.release(r)  # the rest of the body is still on the wire: closed, not pooled
    r = get(server, t)
    assert read_all(r) == b"after"
    assert server.connections == 2


def test_drain_keeps_the_connection(serve):
    server = serve(b"HTTP/1.1 503 Busy\r\nContent-Length: 5\r\nRetry-After: 1\r\n\r\nbusy!", ok(b"ok"))
    t = server.transport()
    r = get(server, t)
    assert r.status == 503 and r.headers["retry-after"] == "1"
    tp.drain(r)
    tp.release(r)
    r = get(server, t)
    assert read_all(r) == b"ok"
    assert server.connections == 1


def test_head_has_no_body(serve):
    server = serve(b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n", ok(b"next"))
    t = server.transport()
    r = t.request("HEAD", server.url + "/", {})
    assert r.status == 200 and r.headers["etag"] == '"e"' and r.data == b""
    r = get(server, t)
    assert read_all(r) == b"next"
    assert server.connections == 1


def test_a_body_cut_short_ends_early_and_its_connection_is_not_reused(serve):
    def cut(conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this")
        return "close"
    server = serve(cut, ok(b"again"))
    t = server.transport()
    r = get(server, t)
    assert read_all(r) == b"only this" and tp.body_reader(r).length == 91
    tp.release(r)
    assert read_all(get(server, t)) == b"again"
    assert server.connections == 2


@pytest.mark.parametrize("garbage", [b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 abc\r\n\r\n"])
def test_not_http_is_a_transport_error(serve, garbage):
    server = serve(garbage)
    with pytest.raises(tp.TransportError):
        get(server)


def test_no_answer_within_the_read_timeout(serve):
    server = serve(lambda conn: time.sleep(2))  # reads the request, answers nothing for a while
    started = time.monotonic()
    with pytest.raises(tp.TransportError, match="(?i)timed? ?out"):
        get(server, server.transport(read_timeout=0.3))
    assert time.monotonic() - started < 1.5


def test_nothing_listening_is_a_refused_connection():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionRefusedError):
        tp.transport({}).request("GET", f"http://127.0.0.1:{port}/", {})


def test_interim_100_continue_is_skipped(serve):
    server = serve(b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"real"))
    r = get(server)
    assert r.status == 200 and read_all(r) == b"real"


def test_interim_103_early_hints_is_skipped_and_nothing_is_left_for_the_next_request(serve):
    server = serve(b"HTTP/1.1 103 Early Hints\r\nLink: </x>; rel=preload\r\n\r\n" + ok(b"first blob"),
                   ok(b"second blob"))
    t = server.transport()
    r = get(server, t)
    assert r.status == 200 and read_all(r) == b"first blob"
    tp.release(r)
    assert read_all(get(server, t)) == b"second blob"


AZURE_ANSWER = (b"Content-Length: 4096\r\nContent-Type: application/octet-stream\r\n"
                b"Content-Range: bytes 0-4095/4096\r\nLast-Modified: Sat, 05 Dec 2026 23:51:44 GMT\r\n"
                b"ETag: \"0x8DE1234\"\r\nServer: Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0\r\n"
                b"x-ms-request-id: 4b1f-0001\r\nx-ms-version: 2025-11-05\r\nx-ms-meta-Note:  two  spaces \r\n"
                b"x-ms-meta-note: second\r\nSet-Cookie: a=1\r\nset-cookie: b=2\r\nEmpty:\r\n\r\nbody")


@pytest.mark.parametrize("block", [
    AZURE_ANSWER,
    b"X-Folded: first\r\n  continued\r\nOther: y\r\n\r\n",  # obsolete line folding
    b"Good: 1\r\nno colon here\r\nAfter: 2\r\n\r\n",  # malformed: a defect, and the rest is not headers
    b": no name\r\nX: 1\r\n\r\n",
    b"Bare: newline\nEnds: too\n\n",
    b"Colon: in: value\r\nStray: car\rriage\r\n\r\n",
    b"Cut: short",  # the connection closed inside the header block
    b"Lf: ends\r\n\nNot: a field\r\n\r\nbody",  # a bare LF line ends the block before the CRLF one
    b"\nNot: a field\r\n\r\n",
    b"".join(b"F%d: v\r\n" % i for i in range(99)) + b"\r\nbody",  # http.client's most fields
])
@pytest.mark.parametrize("buffered", [False, True], ids=["unbuffered", "buffered"])
def test_header_fields_read_as_http_client_reads_them(block, buffered):
    import http.client
    import io

    def reader():  # answers come from a buffered socket file: the block may be taken from its buffer at once
        return io.BufferedReader(io.BytesIO(block)) if buffered else io.BytesIO(block)
    ours_fp, stock_fp = reader(), reader()
    ours, stock = wire.parse_headers_fast(ours_fp), http.client.parse_headers(stock_fp)
    assert ours_fp.read() == stock_fp.read()  # the same bytes were taken as the header block
    assert isinstance(ours, http.client.HTTPMessage)
    assert ours.items() == stock.items() and ours.keys() == stock.keys()
    for name in ("content-length", "ETAG", "x-ms-meta-note", "set-cookie", "empty", "x-folded", "missing", "after"):
        assert ours.get(name) == stock.get(name) and ours[name] == stock[name] and (name in ours) == (name in stock)
        assert ours.get_all(name) == stock.get_all(name)
    assert [type(d) for d in ours.defects] == [type(d) for d in stock.defects]
    assert ours.get_payload() == stock.get_payload() and ours.is_multipart() is False
    if block == AZURE_ANSWER:
        assert type(ours) is wire.Fields  # the fast path took it
        assert ours["x-ms-meta-note"] == "two  spaces " and ours["empty"] == ""


def test_more_header_fields_than_http_client_takes_are_refused_alike():
    import http.client
    import io
    block = b"".join(b"F%d: v\r\n" % i for i in range(100)) + b"\r\nbody"
    for fp in (io.BytesIO(block), io.BufferedReader(io.BytesIO(block))):
        with pytest.raises(http.client.HTTPException, match="more than 100 headers"):
            wire.parse_headers_fast(fp)


def test_answers_parsed_on_the_fast_path_frame_their_bodies_alike(serve):
    head_only = b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\nConnection: keep-alive\r\n\r\n"
    server = serve(b"HTTP/1.1 206 Partial Content\r\n" + AZURE_ANSWER[:-4].replace(b"4096", b"5") + b"hello",
                   head_only, b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 3\r\n\r\nbye")
    t = server.transport()
    r = get(server, t)
    assert r.status == 206 and r.headers["etag"] == '"0x8DE1234"' and r.headers.get_all("set-cookie") == ["a=1", "b=2"]
    assert read_all(r) == b"hello"
    tp.release(r)
    r = t.request("HEAD", server.url + "/", {})
    assert r.status == 200 and r.data == b""  # a HEAD's Content-Length announces no body
    r = get(server, t)
    assert read_all(r) == b"bye" and tp.body_reader(r).will_close
    tp.release(r)
    assert server.connections == 1


@pytest.mark.parametrize("target", [
    "/devstoreaccount1/bench/small/f00001.bin", "/a/b%20c/d?x=1&y=%2B%3D&z=a?b", "/_x_/A-Z.~",
    "/c/b%2Fc?comp=list&restype=container&marker=2%21abc&sig=ab%2Bc%3D",
    # what urllib3 changes: each must still be changed exactly as urllib3 does
    "/a b", "/a/%e2%82%ac", "/a#frag", "/a?b#c", "/\u00fcn\u00ef", "/a/[x]", "/a/%zz", "/a%", '/a?q="x"', "/a|b",
    "/a{b}",
])
def test_request_targets_are_sent_as_urllib3_would_send_them(target, serve):
    import urllib3.connectionpool
    assert wire.encode_target(target) == urllib3.connectionpool._encode_target(target)
    server = serve(ok(b"x"))
    tp.release(get(server, path=target))
    sent = server.requests[0].split(" ")[1]
    assert sent == urllib3.connectionpool._encode_target(target)


def test_connections_idle_past_the_expiry_are_not_reused(serve, monkeypatch):
    server = serve(ok(b"one"), ok(b"two"), ok(b"three"))
    t = server.transport()
    for _ in range(2):
        r = get(server, t)
        read_all(r)
        tp.release(r)
    assert server.connections == 1
    monkeypatch.setattr(tp, "IDLE_EXPIRY", 0.2)
    time.sleep(0.4)
    r = get(server, t)
    assert read_all(r) == b"three"
    assert server.connections == 2


def test_sockets_have_tcp_keepalive(serve):
    server = serve(ok(b"x"))
    t = server.transport()
    r = get(server, t)
    read_all(r)
    tp.release(r)
    conn = t.pool_for(server.url).pool.queue[-1]
    sock = conn.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == tp.KEEPALIVE_IDLE
    assert tp.KEEPALIVE_IDLE + tp.KEEPALIVE_INTERVAL * tp.KEEPALIVE_COUNT < 240  # Azure's idle timeout


# -- what the environment says --------------------------------------------------
@pytest.mark.parametrize("host, port, no_proxy, bypassed", [
    ("acct.blob.core.windows.net", 443, "", False),
    ("acct.blob.core.windows.net", 443, "*", True),
    ("acct.blob.core.windows.net", 443, ".core.windows.net", True),
    ("acct.blob.core.windows.net", 443, "core.windows.net", True),
    ("acct.blob.core.windows.net", 443, "windows.net:80", False),
    ("acct.blob.core.windows.net", 443, "windows.net:443", True),
    ("xcore.windows.net", 443, "core.windows.net", False),
    ("10.1.2.3", 443, "10.0.0.0/8", True),
    ("10.1.2.3", 443, "10.1.2.3", True),
    ("11.1.2.3", 443, "10.0.0.0/8, localhost", False),
    ("localhost", 10000, "example.org,localhost", True),
    ("::1", 10000, "::1", True),
])
def test_no_proxy(host, port, no_proxy, bypassed):
    assert network.bypassed(host, port, no_proxy) is bypassed


def test_proxies_come_from_the_environment_in_either_case():
    t = tp.Transport(tp.settings({"https_proxy": "http://u:secret@proxy.local:3128", "HTTP_PROXY": "proxy.local:8080",
                                  "no_proxy": "127.0.0.1"}))
    assert t.proxy_for("https://acct.blob.core.windows.net/c") == "http://u:secret@proxy.local:3128"
    assert t.proxy_for("http://acct.blob.core.windows.net/c") == "http://proxy.local:8080"
    assert t.proxy_for("http://127.0.0.1:10000/devstoreaccount1") is None
    error = t.translate(OSError("boom"), "https://acct.blob.core.windows.net/c")
    assert "proxy.local:3128" in str(error) and "secret" not in str(error)


def test_a_proxy_naming_no_host_is_a_clear_error():
    t = tp.Transport(tp.settings({"HTTPS_PROXY": "http://u:secret@:3128"}))
    with pytest.raises(ConfigError) as e:
        t.manager_for("https://acct.blob.core.windows.net/c")
    assert "$HTTPS_PROXY" in str(e.value) and "secret" not in str(e.value)


def test_trust_precedence(tmp_path):
    bundle = tmp_path / "ca.pem"
    bundle.write_text("")
    other = tmp_path / "other.pem"
    other.write_text("")
    s = tp.settings({"REQUESTS_CA_BUNDLE": str(bundle), "CURL_CA_BUNDLE": str(other), "SSL_CERT_FILE": str(other)})
    assert (s.ca_file, s.ca_dir) == (str(bundle), None) and "REQUESTS_CA_BUNDLE" in s.ca_source
    s = tp.settings({"CURL_CA_BUNDLE": str(other), "SSL_CERT_FILE": str(bundle)})
    assert s.ca_file == str(other)
    s = tp.settings({"REQUESTS_CA_BUNDLE": str(tmp_path)})  # a directory of hashed certificates
    assert (s.ca_file, s.ca_dir) == (None, str(tmp_path))
    s = tp.settings({"SSL_CERT_FILE": str(bundle), "SSL_CERT_DIR": str(tmp_path)})
    assert (s.ca_file, s.ca_dir) == (str(bundle), str(tmp_path))
    s = tp.settings({})
    assert (s.ca_file, s.ca_dir) == (None, None) and s.ca_source == "the system's certificate store"


@pytest.mark.parametrize("var", ["REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"])
def test_a_trust_variable_naming_nothing_is_a_clear_error(tmp_path, var):
    with pytest.raises(ConfigError, match=f"\\${var} names .*missing"):
        tp.settings({var: str(tmp_path / "missing")})


def test_the_transport_is_made_again_when_the_environment_changes(tmp_path):
    first = tp.transport({})
    assert tp.transport({}) is first
    assert tp.transport({"HTTPS_PROXY": "http://p:1"}) is not first


def test_the_sdk_session_draws_on_the_transport(serve):
    import requests
    server = serve(ok(b"via sdk session"), ok(b"via lean path"))
    t = server.transport()
    session = t.requests_session()
    assert session.trust_env is False
    assert session.get(server.url + "/x").content == b"via sdk session"
    r = get(server, t)
    assert read_all(r) == b"via lean path"
    assert server.connections == 1  # one pool: the session's connection served the lean request
    assert isinstance(session, requests.Session)


def test_environment_is_not_read_for_trust_by_the_sdk_session(serve, monkeypatch, tmp_path):
    # requests alone would honour $REQUESTS_CA_BUNDLE for its own pools: the
    # session must not, the transport already has
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "nothing-here.pem"))
    server = serve(ok(b"fine"))
    session = server.transport().requests_session()
    assert session.get(server.url + "/").content == b"fine"
    assert os.environ["REQUESTS_CA_BUNDLE"].endswith("nothing-here.pem")
