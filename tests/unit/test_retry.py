"""The one retry policy (storage/retry.py): which answers are asked again,
how long it waits, when it gives up; and the SDK clients, on a real HTTP
server, retrying through it."""

import time

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import BlobClient

from mountd.storage.retry import MAX_RETRY_AFTER, StoragePolicy, transient_answer
from mountd.storage.sdk import RETRIES_SEEN, client_options
from tests.support.scripted_http import ScriptedServer

FAST = StoragePolicy(retries=3, backoff=0.01, backoff_max=0.02, connect_timeout=2, read_timeout=2)


def test_transient_answers():
    for status in (408, 429, 500, 502, 503, 504, 507):
        assert transient_answer(status)
    for status in (200, 206, 304, 400, 403, 404, 409, 412, 416, 501, 505):
        assert not transient_answer(status)
    # a copy whose source was busy is worth another try; one whose source is missing is not
    assert transient_answer(409, {"x-ms-copy-source-error-code": "ServerBusy"})
    assert not transient_answer(404, {"x-ms-copy-source-error-code": "BlobNotFound"})


def test_wait_honours_retry_after_within_a_cap():
    p = StoragePolicy(backoff=0.5, backoff_max=4.0)
    assert p.wait(1, 3.0) == 3.0 and p.wait(1, 1e6) == MAX_RETRY_AFTER and p.wait(5, 0.0) == 0.0
    assert 0.25 <= p.wait(1) <= 0.5 and 2.0 <= p.wait(10) <= 4.0


def test_next_try_counts_then_raises_the_error():
    p = StoragePolicy(retries=2, backoff=0.001, backoff_max=0.001)
    error = OSError("reset")
    assert p.next_try(0, error) == 1 and p.next_try(1, error) == 2
    with pytest.raises(OSError) as caught:
        p.next_try(2, error)
    assert caught.value is error


def _answer(status: int, *headers: str) -> bytes:
    head = [f"HTTP/1.1 {status} X", "Content-Length: 0", "x-ms-request-id: r", *headers]
    return ("\r\n".join(head) + "\r\n\r\n").encode()


PROPERTIES = _answer(200, "ETag: \"0x1\"", "Last-Modified: Mon, 01 Jan 2024 00:00:00 GMT",
                     "x-ms-blob-type: BlockBlob", "x-ms-content-length: 0")


def _properties(server: ScriptedServer, p: StoragePolicy = FAST):
    client = BlobClient.from_blob_url(f"{server.url}/c/b", **client_options(p))
    with client:
        return client.get_blob_properties()


def test_sdk_retries_503_after_the_time_asked_and_500():
    server = ScriptedServer([_answer(503, "Retry-After: 1"), _answer(500), PROPERTIES])
    before = RETRIES_SEEN.count
    started = time.monotonic()
    assert _properties(server).etag == '"0x1"'
    assert time.monotonic() - started >= 1.0  # Retry-After, not the 10 ms backoff
    assert len(server.requests) == 3 and RETRIES_SEEN.count == before + 2


def test_sdk_does_not_retry_what_a_retry_cannot_fix():
    server = ScriptedServer([_answer(501), PROPERTIES])
    with pytest.raises(HttpResponseError):
        _properties(server)
    assert len(server.requests) == 1


def test_sdk_gives_up_after_the_budget():
    server = ScriptedServer([_answer(500)] * 5 + [PROPERTIES])
    with pytest.raises(HttpResponseError):
        _properties(server, StoragePolicy(retries=2, backoff=0.01, backoff_max=0.01))
    assert len(server.requests) == 3  # the try and two retries
