"""How an answer is read off the wire and a request target written on it:
http.client's own reading, made stricter and cheaper where it matters,
and for the ranged reads a minimal writer and reader of their own.

Interim answers (1xx other than 101) are skipped, so the final answer is
the one read and nothing of it is left on a pooled connection. Plain
header blocks are parsed without the email package, and the request
targets the lean path builds skip urllib3's character-by-character
check. Each saving is measured where it is made.

The ranged reads (`Transport.get`, direct routes) write their GET and read
the usual answer themselves (`Link`, `Reply`), on urllib3's pooled
connections: urllib3 still connects, verifies TLS, keeps the pool, the
keep-alive and the idle expiry, and http.client still reads every answer
that is not HTTP/1.1 framed by Content-Length (chunked, framed by the
close, malformed), from the same bytes. Why: after every other cut,
http.client's own per-request Python work (putrequest/putheader/
endheaders checks and list building, a socket file per answer, readline
and begin()'s bookkeeping) was what kept small-file downloads behind
rclone. 4 KiB ranged reads from Azurite, one thread, thread CPU per read,
medians of 7 paired rounds of 1 500, quiet host: 0.177 ms -> 0.133 (the
hand-written client of before the transport, same rounds: 0.103; on a
loaded host 0.195 -> 0.143); 16 threads reading 2000 x 256 KiB blobs:
0.414 -> 0.320 ms of process CPU per blob (loaded: 0.389 -> 0.305).
`bench_download --skip-big --repeat 7 --baseline`, quiet host: 1.03x
rclone and 1.36 ms of CPU per file, the code before 1.00x and 1.40 ms.
"""

from __future__ import annotations

import http.client
import io
import re
import types

import urllib3

# An answer's header block that needs no more than a split of each line at
# its first colon: fields `Name: value` (a name of visible characters other
# than ':', a value on one line), then the empty line. The value is what the
# email package's compat32 policy makes of it: leading blanks dropped.
_PLAIN_BLOCK = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r?\n)*\r?\n")
_FIELD = re.compile(r"([!-9;-~]+):[ \t]*([^\r\n]*)\r?\n")


class Fields(http.client.HTTPMessage):
    """An answer's header fields, the HTTPMessage that http.client and
    urllib3 expect, made without the email package's parser: that parser,
    and Message.get re-checking every field on each look-up, cost more CPU
    than the rest of a small ranged read's handling in urllib3 and
    http.client together (see `parse_headers_fast`). Look-ups scan the fields
    as Message does, first match wins, so the message stays a plain
    Message to anything that reads or changes it."""

    _headers: list[tuple[str, str]]  # Message's own list of fields (not in its type stubs)
    _index: dict | None = None
    _indexed: tuple = ()

    def get(self, name, failobj=None):
        # by name, made at the first look-up (an answer is asked for some
        # six fields); made again if the fields have changed since
        fields = self._headers
        if self._indexed != (id(fields), len(fields)) or self._index is None:
            self._index = {k.lower(): v for k, v in reversed(fields)}  # the first of a name wins
            self._indexed = (id(fields), len(fields))
        return self._index.get(name.lower(), failobj)

    def replace_header(self, _name, _value):
        self._index = None  # changes a field in place, which the check in get() would not see
        super().replace_header(_name, _value)

    def items(self):
        # Message.items passes each value through the policy, which changes
        # only values holding surrogates: latin-1 text from the wire has none.
        return list(self._headers)


def buffered_block(fp) -> bytes | None:
    """The header block, taken in one read if it is already in `fp`'s
    buffer whole (as a small block arriving with its status line is)
    within http.client's limit on the number of fields; else None, and
    nothing read. http.client reads it a line at a time: about a fifth
    of a ranged read's CPU on a connection that is otherwise idle."""
    head = fp.peek(1) if hasattr(fp, "peek") else b""
    if head.startswith(b"\r\n"):
        size = 2
    else:
        end = head.find(b"\r\n\r\n")
        if end < 0:
            return None
        size = end + 4
    block = head[:size]
    # a bare LF line would end the block where http.client ends it: earlier
    if block.startswith(b"\n") or b"\n\n" in block or block.count(b"\n") > http.client._MAXHEADERS:  # type: ignore[attr-defined]  # private: not in the stubs
        return None
    return fp.read(size)


def parse_headers_fast(fp, _class=None):
    """http.client.parse_headers, fast for the usual header block (see
    _PLAIN_BLOCK); anything else (folded lines, malformed fields, a block
    cut short) goes to http.client's own parser, defects and all. Measured
    on 4 KiB ranged reads from Azurite, medians of 8 rounds of 1 500:
    0.38 ms of CPU per request -> 0.29."""
    block = buffered_block(fp) or b"".join(http.client._read_headers(fp))  # type: ignore[attr-defined]  # its limits on line length and count (private)
    text = block.decode("iso-8859-1")
    if not _PLAIN_BLOCK.fullmatch(text):
        return http.client.parse_headers(io.BytesIO(block))
    return _fields(text)


def _fields(text: str) -> Fields:
    """The Fields of a header block that _PLAIN_BLOCK matches."""
    message = Fields()
    message._headers = _FIELD.findall(text)
    message.set_payload("")  # as the email parser leaves it: nothing after the header block
    return message


def with_globals(function, module, **replaced):
    """`function` (of `module`) as it is, but looking up the names in
    `replaced` as given here: a library's own method with one helper it
    calls swapped for ours, instead of a copy of its logic, and nothing
    changed for the library's other users."""
    copy = types.FunctionType(function.__code__, {**vars(module), **replaced}, function.__name__,
                              function.__defaults__, function.__closure__)
    copy.__kwdefaults__, copy.__doc__ = function.__kwdefaults__, function.__doc__
    return copy


class Answer(http.client.HTTPResponse):
    """A response that reads past interim answers: http.client skips
    100 Continue only, and would take 103 Early Hints for the answer,
    leaving the real one on the connection for the next request. Its
    header fields are read by `parse_headers_fast`: http.client's own begin(),
    run with that function in place of its parse_headers."""

    begin = with_globals(http.client.HTTPResponse.begin, http.client, parse_headers=parse_headers_fast)

    def _read_status(self):
        while True:
            version, status, reason = super()._read_status()  # type: ignore[misc]  # private: not in the stubs
            if not (100 < status < 200) or status == 101:
                return version, status, reason
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]  # the interim answer's headers, read and dropped

    # where the connection goes back to (see Transport.get): its pool and
    # itself, or the urllib3 response that owns it
    home: tuple | None = None
    wrapper: urllib3.BaseHTTPResponse | None = None
    link: "Link | None" = None  # the Link it was read from, if one

    def reusable(self) -> bool:
        """Whether the connection can carry the next request: the body read
        to its end by its framing, no close announced, nothing more
        received."""
        return self.isclosed() and not self.will_close and not self.length and (
            self.link is None or self.link.idle())


# A request target that urllib3 would send as it is: RFC 3986 path and
# query characters, percent-encodings in upper case, no fragment.
_SENDABLE_TARGET = re.compile(r"/(?:[\w\-.~!$&'()*+,;=:@/]|%[0-9A-F]{2})*"
                              r"(?:\?(?:[\w\-.~!$&'()*+,;=:@/?]|%[0-9A-F]{2})*)?", re.ASCII)


def encode_target(target: str) -> str:
    """urllib3's _encode_target, skipped for a target it would not change
    (every one the lean path builds: it quotes names itself). urllib3
    checks the target one character at a time in Python. CPU per 4 KiB
    read from Azurite, medians of 8 rounds of 1 500: with a SAS (some 150
    characters of query) 0.302 ms -> 0.260, with the account key 0.272 ->
    0.263."""
    if _SENDABLE_TARGET.fullmatch(target):
        return target
    return urllib3.connectionpool._encode_target(target)


# -- the ranged reads' own request writer and answer reader -------------------
# A status line and a header block the lean reader takes itself: HTTP/1.1,
# every line ended by CRLF, fields as _PLAIN_BLOCK has them. Anything else
# (HTTP/1.0, bare LF, folded or malformed lines, a stray CR) is read by
# http.client (`Link.answer`), as before.
_STATUS_LINE = re.compile(r"HTTP/1\.1 (\d\d\d)(?: ([^\r\n]*))?\r\n")
_CRLF_BLOCK = re.compile(r"(?:[!-9;-~]+:[^\r\n]*\r\n)*\r\n")
_DIGITS = re.compile(r"[0-9]+")
# Request fields as they go on the wire; with one LF per field, no name or
# value holds a CR or an LF (a header cannot inject another).
_REQUEST_FIELDS = re.compile(r"(?:[!-9;-~]+: [^\r\n]*\r\n)*")
# The most a status line and header block may take: http.client's limit on
# one line. A longer head goes to http.client, which refuses it its way.
_HEAD_LIMIT = 65536
_BUFFER = 16384  # receive buffer per connection: a small answer arrives whole


class Link:
    """One connection's socket as the lean reader uses it: requests written
    with one sendall, answers read through one receive buffer kept for the
    socket's life (http.client makes a socket file, with its buffer, per
    answer). A request is never sent before the previous answer is read, so
    bytes left in the buffer after an answer are the server's error: such
    a connection is not reused (`Reply.reusable`)."""

    __slots__ = ("sock", "host", "buf", "view", "start", "end")

    def __init__(self, sock, host: str):
        self.sock, self.host = sock, host
        self.buf = bytearray(_BUFFER)
        self.view = memoryview(self.buf)
        self.start = self.end = 0

    def send_get(self, target: str, user_agent: str, headers: dict) -> None:
        """Write `GET target` with Host, User-Agent and `headers`, as
        http.client's putrequest/putheader write them (no Accept-Encoding),
        in one piece. A name or value holding CR or LF raises ValueError."""
        fields = "".join([f"{name}: {value}\r\n" for name, value in headers.items()])
        if fields.count("\n") != len(headers) or not _REQUEST_FIELDS.fullmatch(fields):
            raise ValueError("a request header name or value is not one line of visible text")
        self.sock.sendall(f"GET {target} HTTP/1.1\r\nHost: {self.host}\r\nUser-Agent: {user_agent}\r\n"
                          f"{fields}\r\n".encode("latin-1"))

    def answer(self):
        """The answer to the request just sent: a `Reply` for the usual one
        (HTTP/1.1, body framed by Content-Length), interim answers (1xx but
        101) read and dropped; any other (chunked, framed by the close, a
        head it does not take, nothing at all) read by http.client from the
        same bytes: an `Answer`, errors and all."""
        if self.start == self.end:
            self.start = self.end = 0  # the head from the buffer's start: moved less often
        buf = self.buf
        while True:
            start = self.start
            while (end := buf.find(b"\r\n\r\n", start, self.end)) < 0:
                # a bare LF line would end the head where http.client ends it
                if buf.find(b"\n\n", start, self.end) >= 0 or buf.find(b"\n\r\n", start, self.end) >= 0:
                    return self._by_http_client()
                if not self._fill():
                    return self._by_http_client()
                start, buf = self.start, self.buf  # moved or grown
            text = buf[start:end + 4].decode("iso-8859-1")
            status_line = _STATUS_LINE.match(text)
            if status_line is None:
                return self._by_http_client()
            status = int(status_line[1])
            if 100 <= status < 200 and status != 101:
                self.start = end + 4  # an interim answer: the final one follows
                continue
            block = text[status_line.end():]
            if status in (101, 204, 304) or not _CRLF_BLOCK.fullmatch(block):
                return self._by_http_client()
            headers = _fields(block)
            length = headers.get("content-length")
            if (len(headers._headers) >= http.client._MAXHEADERS  # type: ignore[attr-defined]  # its limit counts the empty line
                    or length is None or not _DIGITS.fullmatch(length) or headers.get("transfer-encoding") is not None):
                return self._by_http_client()
            self.start = end + 4
            connection = headers.get("connection")
            return Reply(self, status, status_line[2] or "", headers, int(length),
                         connection is not None and "close" in connection.lower())

    def _fill(self) -> int:
        """Receive more of a head into the buffer (moved to its start, or
        grown, when full): the number of bytes, 0 at the end of the stream
        or once the head would pass _HEAD_LIMIT."""
        if self.end == len(self.buf):
            kept = self.end - self.start
            if kept >= _HEAD_LIMIT:
                return 0
            if kept * 2 > len(self.buf):
                grown = bytearray(min(len(self.buf) * 2, _HEAD_LIMIT))
                grown[:kept] = self.view[self.start:self.end]
                self.view.release()
                self.buf, self.view = grown, memoryview(grown)
            else:  # (kept is at most half the buffer: the two ranges do not overlap)
                self.buf[:kept] = self.view[self.start:self.end]
            self.start, self.end = 0, kept
        n = self.sock.recv_into(self.view[self.end:])
        self.end += n
        return n

    def take(self, b, most: int) -> int:
        """Up to `most` (> 0) bytes into b: buffered ones first, else one
        receive straight into b. 0 at the end of the stream."""
        if self.start < self.end:
            n = min(most, len(b), self.end - self.start)
            b[:n] = self.view[self.start:self.start + n]
            self.start += n
            if self.start == self.end:
                self.start = self.end = 0
            return n
        return self.sock.recv_into(b, min(most, len(b)))

    def idle(self) -> bool:
        """Nothing received beyond the answers read."""
        return self.start == self.end

    def _by_http_client(self) -> Answer:
        fp = io.BufferedReader(_Rest(self))
        answer = Answer(types.SimpleNamespace(makefile=lambda *_: fp), method="GET")  # type: ignore[arg-type]  # only its makefile is used
        answer.link = self
        answer.begin()
        return answer


class _Rest(io.RawIOBase):
    """A link's bytes from where its reader has got to: what is buffered,
    then the socket (for http.client, when it reads an answer)."""

    def __init__(self, link: Link):
        self.link = link

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.link.take(b, len(b))


class Reply:
    """An answer read by `Link`, its body framed by Content-Length, with the
    part of http.client's HTTPResponse that the data path uses: status,
    headers, readinto/read, length (what is left), will_close."""

    __slots__ = ("link", "_reading", "status", "reason", "headers", "length", "will_close", "home")
    wrapper = None  # no urllib3 response owns it (see transport.release)
    chunked = False
    version = 11

    def __init__(self, link: Link, status: int, reason: str, headers: Fields, length: int, will_close: bool):
        self.link, self._reading = link, length > 0
        self.status, self.reason, self.headers = status, reason, headers
        self.length, self.will_close = length, will_close
        self.home: tuple | None = None

    @property
    def msg(self) -> Fields:
        return self.headers

    def getheader(self, name: str, default=None):
        return self.headers.get(name, default)

    def getheaders(self) -> list[tuple[str, str]]:
        return self.headers.items()

    def readinto(self, b) -> int:
        if not self._reading or not len(b):
            return 0
        n = self.link.take(b, self.length)
        if not n:
            self._reading = False  # cut short: `length` says by how much
            return 0
        self.length -= n
        if not self.length:
            self._reading = False
        return n

    def read(self, amt: int | None = None) -> bytes:
        want = self.length if amt is None else min(amt, self.length)
        out = bytearray(want)
        view, got = memoryview(out), 0
        while got < want and (n := self.readinto(view[got:])):
            got += n
        if amt is None and got < want:
            raise http.client.IncompleteRead(bytes(out[:got]), want - got)
        return bytes(out[:got])

    def isclosed(self) -> bool:
        return not self._reading

    def close(self) -> None:
        self._reading = False

    def reusable(self) -> bool:
        """Whether the connection can carry the next request: the body read
        to its end, no close announced, nothing more received."""
        return self.length == 0 and not self.will_close and self.link.idle()
