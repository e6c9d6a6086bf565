"""How an answer is read off the wire and a request target written on it:
http.client's own reading, made stricter and cheaper where it matters.

Interim answers (1xx other than 101) are skipped, so the final answer is
the one read and nothing of it is left on a pooled connection. Plain
header blocks are parsed without the email package, and the request
targets the lean path builds skip urllib3's character-by-character
check. Each saving is measured where it is made.
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


putrequest, putheader = http.client.HTTPConnection.putrequest, http.client.HTTPConnection.putheader
