"""Tests of the Azure Files emulator, driven by the real azure-storage-file-share SDK.

Protocol details the SDK hides (status lines, headers, keep-alive, raw error
bodies) are checked with http.client, signing requests with the SDK's own
SharedKey policy so the emulator's verifier is tested against an independent
implementation.
"""

from __future__ import annotations

import hashlib
import http.client
import selectors
import socket
import ssl
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timedelta, timezone
from email.utils import formatdate
from pathlib import Path

import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline import PipelineContext, PipelineRequest
from azure.core.rest import HttpRequest
from azure.storage.fileshare import (
    AccountSasPermissions,
    ContentSettings,
    FileSasPermissions,
    ResourceTypes,
    ShareClient,
    ShareFileClient,
    ShareSasPermissions,
    ShareServiceClient,
    generate_account_sas,
    generate_file_sas,
    generate_share_sas,
)
from azure.storage.fileshare._shared.authentication import SharedKeyCredentialPolicy

from tests.emulators.fileshare import ACCOUNT_KEY, ACCOUNT_NAME, FileShareEmulator
from tests.support.identity import storage_token

REPO_ROOT = Path(__file__).resolve().parents[2]
MIB = 1024 * 1024
WRONG_KEY = "A" * 86 + "=="


# --------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulator():
    with FileShareEmulator() as running:
        yield running


@pytest.fixture
def service(emulator):
    # retry_total=0: an emulator bug must fail fast, not be retried away.
    return ShareServiceClient.from_connection_string(emulator.connection_string, retry_total=0)


@pytest.fixture
def key_service(emulator):
    return ShareServiceClient(emulator.account_url, credential=ACCOUNT_KEY, retry_total=0)


@pytest.fixture
def share(service):
    client = service.create_share(f"share-{uuid.uuid4().hex[:12]}")
    yield client
    try:
        client.delete_share()
    except ResourceNotFoundError:
        pass


def payload(size: int) -> bytes:
    # Position-dependent content so shifted or reordered ranges are caught.
    block = hashlib.sha256(str(size).encode()).digest() * 4096
    repeats = size // len(block) + 1
    return (block * repeats)[:size]


def expiry() -> datetime:
    return datetime.now(timezone.utc) + timedelta(hours=1)


def signed_headers(emulator, method: str, path_and_query: str, headers=None, key: str = ACCOUNT_KEY) -> dict:
    """Headers for a raw request, signed by the SDK's SharedKey policy."""
    request = HttpRequest(method, f"http://127.0.0.1:{emulator.port}{path_and_query}", headers=dict(headers or {}))
    request.headers["x-ms-date"] = formatdate(usegmt=True)
    request.headers.setdefault("x-ms-version", "2025-05-05")
    SharedKeyCredentialPolicy(ACCOUNT_NAME, key).on_request(PipelineRequest(request, PipelineContext(None)))
    return dict(request.headers)


def raw_request(connection, emulator, method, path_and_query, headers=None, body=b"", key=ACCOUNT_KEY):
    headers = dict(headers or {})
    if method == "PUT" or body:
        headers["Content-Length"] = str(len(body))
    connection.request(method, path_and_query, body=body or None,
                       headers=signed_headers(emulator, method, path_and_query, headers, key))
    response = connection.getresponse()
    return response, response.read()


def error_code_of(body: bytes) -> str:
    return ET.fromstring(body).findtext("Code")


# --------------------------------------------------------------------------
# Shares
# --------------------------------------------------------------------------


def test_share_lifecycle(service):
    name = f"life-{uuid.uuid4().hex[:8]}"
    share = service.create_share(name, metadata={"owner": "tests"}, quota=7)
    properties = share.get_share_properties()
    assert properties.name == name
    assert properties.quota == 7
    assert properties.metadata == {"owner": "tests"}
    assert properties.etag and properties.last_modified

    with pytest.raises(ResourceExistsError) as exists:
        service.create_share(name)
    assert exists.value.error_code == "ShareAlreadyExists"

    listed = {item.name: item for item in service.list_shares(name_starts_with="life-", include_metadata=True)}
    assert listed[name].metadata == {"owner": "tests"}

    share.delete_share()
    with pytest.raises(ResourceNotFoundError) as missing:
        share.get_share_properties()
    assert missing.value.error_code == "ShareNotFound"


def test_list_shares_pages(service):
    prefix = f"pg{uuid.uuid4().hex[:6]}-"
    names = [f"{prefix}{index:02d}" for index in range(7)]
    for name in names:
        service.create_share(name)
    try:
        pages = [[item.name for item in page]
                 for page in service.list_shares(name_starts_with=prefix, results_per_page=3).by_page()]
        assert [len(page) for page in pages] == [3, 3, 1]
        assert sorted(sum(pages, [])) == names
    finally:
        for name in names:
            service.delete_share(name)


def test_key_credential_client_works(key_service, share):
    # The same share seen through a client built from URL + key.
    directory = key_service.get_share_client(share.share_name).create_directory("via-key")
    assert directory.get_directory_properties().is_directory


# --------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------


def test_nested_directories(share):
    share.create_directory("a")
    share.create_directory("a/b")
    leaf = share.create_directory("a/b/c")
    root_id = share.get_directory_client().get_directory_properties().file_id
    assert share.get_directory_client("a").get_directory_properties().parent_id == root_id
    properties = leaf.get_directory_properties()
    parent = share.get_directory_client("a/b").get_directory_properties()
    assert properties.file_id and properties.parent_id == parent.file_id
    assert "Directory" in str(properties.file_attributes)
    assert [(item.name, item.is_directory) for item in share.list_directories_and_files("a/b")] == [("c", True)]

    with pytest.raises(ResourceExistsError) as exists:
        share.create_directory("a/b")
    assert exists.value.error_code == "ResourceAlreadyExists"


def test_missing_parent_is_parent_not_found(share):
    with pytest.raises(ResourceNotFoundError) as directory_error:
        share.create_directory("missing/child")
    assert directory_error.value.error_code == "ParentNotFound"

    with pytest.raises(ResourceNotFoundError) as file_error:
        share.get_file_client("missing/file.txt").upload_file(b"data")
    assert file_error.value.error_code == "ParentNotFound"


def test_delete_non_empty_directory_fails(share):
    directory = share.create_directory("full")
    directory.upload_file("inside.txt", b"x")
    with pytest.raises(ResourceExistsError) as not_empty:
        directory.delete_directory()
    assert not_empty.value.error_code == "DirectoryNotEmpty"

    directory.delete_file("inside.txt")
    directory.delete_directory()
    with pytest.raises(ResourceNotFoundError):
        directory.get_directory_properties()


def test_listing_pages_through_all_entries(share):
    directory = share.create_directory("many")
    names = sorted(f"file-{index:02d}.txt" for index in range(20)) + [f"sub-{index}" for index in range(5)]
    for name in names[:20]:
        directory.upload_file(name, name.encode())
    for name in names[20:]:
        directory.create_subdirectory(name)

    pages = [list(page) for page in directory.list_directories_and_files(results_per_page=10).by_page()]
    assert [len(page) for page in pages] == [10, 10, 5]
    listed = [item.name for page in pages for item in page]
    assert sorted(listed) == sorted(names)
    assert len(set(listed)) == 25

    sizes = {item.name: item.size for page in pages for item in page if not item.is_directory}
    assert sizes == {name: len(name) for name in names[:20]}
    assert [item.name for item in directory.list_directories_and_files(name_starts_with="sub-")] == names[20:]


def test_listing_includes_requested_details(share):
    directory = share.create_directory("details")
    directory.upload_file("f.bin", b"12345")
    directory.create_subdirectory("d")
    file_properties = directory.get_file_client("f.bin").get_file_properties()

    items = {item.name: item for item in directory.list_directories_and_files(
        include=["timestamps", "Etag", "Attributes", "PermissionKey"], include_extended_info=True)}
    listed_file = items["f.bin"]
    assert listed_file.size == 5
    assert listed_file.file_id == file_properties.file_id
    assert listed_file.etag == file_properties.etag
    assert listed_file.creation_time and listed_file.last_write_time and listed_file.change_time
    assert listed_file.last_modified is not None
    assert "Archive" in str(listed_file.file_attributes)
    assert listed_file.permission_key
    assert items["d"].is_directory and "Directory" in str(items["d"].file_attributes)

    plain = {item.name: item for item in directory.list_directories_and_files()}
    assert plain["f.bin"].size == 5 and plain["f.bin"].etag is None


# --------------------------------------------------------------------------
# Files: content
# --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 4 * MIB, 4 * MIB + 1, 20 * MIB + 3])
def test_upload_download_round_trip(share, size):
    data = payload(size)
    client = share.get_file_client(f"blob-{size}.bin")
    client.upload_file(data, max_concurrency=4)
    assert client.get_file_properties().size == size
    assert client.download_file().readall() == data
    assert client.download_file(max_concurrency=4).readall() == data


def test_parallel_chunked_download(emulator, share):
    data = payload(9 * MIB + 123)
    share.get_file_client("parallel.bin").upload_file(data, max_concurrency=4)
    # Small chunk sizes force many concurrent ranged GETs.
    client = ShareFileClient(emulator.account_url, share.share_name, "parallel.bin", credential=ACCOUNT_KEY,
                             max_single_get_size=MIB, max_chunk_get_size=MIB, retry_total=0)
    statuses = []
    downloaded = client.download_file(max_concurrency=8, raw_response_hook=lambda response: statuses.append(
        response.http_response.status_code)).readall()
    assert downloaded == data
    assert statuses.count(206) >= 9


def test_ranged_download(share):
    data = payload(100_000)
    client = share.get_file_client("ranged.bin")
    client.upload_file(data)
    assert client.download_file(offset=1234, length=5000).readall() == data[1234:6234]
    assert client.download_file(offset=99_990).readall() == data[99_990:]
    with pytest.raises(HttpResponseError) as beyond:
        client.download_file(offset=200_000, length=10).readall()
    assert beyond.value.status_code == 416
    assert beyond.value.error_code == "InvalidRange"


def test_upload_range_and_clear_range(share):
    client = share.get_file_client("sparse.bin")
    client.create_file(4096)
    client.upload_range(b"a" * 1024, offset=0, length=1024)
    client.upload_range(b"b" * 512, offset=2048, length=512)
    assert [(item.start, item.end) for item in client.list_ranges()] == [(0, 1023), (2048, 2559)]
    pages = [[(item.start, item.end) for item in page] for page in client.list_ranges(results_per_page=1).by_page()]
    assert pages == [[(0, 1023)], [(2048, 2559)]]

    client.clear_range(offset=0, length=512)
    assert [(item.start, item.end) for item in client.list_ranges()] == [(512, 1023), (2048, 2559)]
    assert [(item.start, item.end) for item in client.list_ranges(offset=600, length=2000)] == [
        (600, 1023), (2048, 2559)]
    content = client.download_file().readall()
    assert content[:512] == bytes(512) and content[512:1024] == b"a" * 512
    assert content[1024:2048] == bytes(1024) and content[2048:2560] == b"b" * 512

    with pytest.raises(HttpResponseError) as beyond:
        client.upload_range(b"x" * 10, offset=4090, length=10)
    assert beyond.value.error_code == "InvalidRange"


def test_upload_with_md5_validation(share):
    client = share.get_file_client("validated.bin")
    data = payload(5 * MIB)
    client.upload_file(data, validate_content=True)
    assert client.download_file(validate_content=True).readall() == data


def test_set_http_headers_and_resize(share):
    client = share.get_file_client("headers.txt")
    client.upload_file(b"hello world")
    md5 = bytearray(hashlib.md5(b"hello world").digest())
    client.set_http_headers(ContentSettings(content_type="text/plain", content_language="en",
                                            cache_control="no-cache", content_md5=md5))
    settings = client.get_file_properties().content_settings
    assert settings.content_type == "text/plain"
    assert settings.content_language == "en"
    assert settings.cache_control == "no-cache"
    assert settings.content_md5 == md5

    client.resize_file(5)
    assert client.download_file().readall() == b"hello"
    client.resize_file(8)
    assert client.download_file().readall() == b"hello\0\0\0"


# --------------------------------------------------------------------------
# Files: properties, metadata, etags, conditions
# --------------------------------------------------------------------------


def test_file_properties_fields(share):
    directory = share.create_directory("props")
    client = directory.upload_file("p.txt", b"abc", metadata={"kind": "test"},
                                   content_settings=ContentSettings(content_type="text/csv"))
    properties = client.get_file_properties()
    assert properties.name == "p.txt"
    assert properties.size == 3
    assert properties.etag.startswith('"0x')
    assert properties.last_modified is not None
    assert properties.content_settings.content_type == "text/csv"
    assert properties.metadata == {"kind": "test"}
    assert "Archive" in str(properties.file_attributes)
    assert isinstance(properties.creation_time, datetime)
    assert isinstance(properties.last_write_time, datetime)
    assert isinstance(properties.change_time, datetime)
    assert properties.file_id and properties.permission_key
    assert properties.parent_id == directory.get_directory_properties().file_id


def test_etag_changes_on_every_write(share):
    client = share.get_file_client("etag.bin")
    client.upload_file(b"0123456789")
    seen = [client.get_file_properties().etag]
    client.upload_range(b"xx", offset=0, length=2)
    seen.append(client.get_file_properties().etag)
    client.set_file_metadata({"a": "1"})
    seen.append(client.get_file_properties().etag)
    client.set_http_headers(ContentSettings(content_type="text/plain"))
    seen.append(client.get_file_properties().etag)
    assert len(set(seen)) == len(seen)


def test_metadata_round_trip(share):
    directory = share.create_directory("meta", metadata={"Level": "dir"})
    assert directory.get_directory_properties().metadata == {"Level": "dir"}
    directory.set_directory_metadata({"changed": "yes"})
    assert directory.get_directory_properties().metadata == {"changed": "yes"}

    client = directory.upload_file("m.txt", b"x")
    client.set_file_metadata({"Author": "someone", "note": "spaces and ünïcode-free"})
    assert client.get_file_properties().metadata == {"Author": "someone", "note": "spaces and ünïcode-free"}
    assert client.download_file().properties.metadata == {"Author": "someone", "note": "spaces and ünïcode-free"}
    client.set_file_metadata({})
    assert client.get_file_properties().metadata == {}

    share.set_share_metadata({"share_level": "1"})
    assert share.get_share_properties().metadata == {"share_level": "1"}


def test_conditional_download(share):
    client = share.get_file_client("conditional.txt")
    client.upload_file(b"content")
    etag = client.get_file_properties().etag
    assert client.download_file(headers={"If-Match": etag}).readall() == b"content"
    with pytest.raises(ResourceModifiedError) as stale:
        client.download_file(headers={"If-Match": '"0x1"'}).readall()
    assert stale.value.error_code == "ConditionNotMet"


def test_conditional_reads_refused_like_the_service():
    with FileShareEmulator(conditional_reads=False) as strict:
        service = ShareServiceClient.from_connection_string(strict.connection_string, retry_total=0)
        client = service.create_share("strict").get_file_client("f.txt")
        client.upload_file(b"content")
        etag = client.get_file_properties().etag
        for headers in ({"If-Match": etag}, {"If-None-Match": '"0x1"'}):
            with pytest.raises(HttpResponseError) as refused:
                client.download_file(headers=headers).readall()
            assert refused.value.status_code == 400
            assert refused.value.error_code == "ConditionHeadersNotSupported"
        assert client.download_file().readall() == b"content"  # plain reads still work


# --------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------


AWKWARD_NAMES = ["with space.txt", "café é.txt", "日本語.bin", "100%.txt", "hash#tag.txt", "plus+sign.txt",
                 "all %20 #+ é 日本"]


@pytest.mark.parametrize("name", AWKWARD_NAMES)
def test_awkward_names(emulator, share, name):
    directory = share.create_directory(f"dir {name}")
    client = directory.get_file_client(name)
    client.upload_file(name.encode("utf-8"))
    assert client.download_file().readall() == name.encode("utf-8")
    assert client.get_file_properties().name == name
    assert [item.name for item in directory.list_directories_and_files()] == [name]
    assert [item.name for item in share.list_directories_and_files()] == [f"dir {name}"]
    # Content is stored under the decoded names, not their URL encoding.
    assert (Path(emulator.location) / "shares" / share.share_name / f"dir {name}" / name).is_file()


def test_names_are_case_insensitive_but_preserved(share):
    share.get_file_client("ReadMe.TXT").upload_file(b"case")
    assert share.get_file_client("readme.txt").download_file().readall() == b"case"
    assert [item.name for item in share.list_directories_and_files()] == ["ReadMe.TXT"]
    share.create_directory("Dir")
    with pytest.raises(ResourceExistsError):
        share.create_directory("DIR")


def test_trailing_dots_are_trimmed_like_the_service(share):
    share.get_file_client("trailing.").upload_file(b"dots")
    assert share.get_file_client("trailing").download_file().readall() == b"dots"
    assert [item.name for item in share.list_directories_and_files()] == ["trailing"]


def test_dot_dot_cannot_escape_location(emulator, share):
    with closing(http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)) as connection:
        for path in (f"/{ACCOUNT_NAME}/{share.share_name}/%2E%2E/escape.txt",
                     f"/{ACCOUNT_NAME}/{share.share_name}/sub%2F..%2F..%2Fescape.txt"):
            response, body = raw_request(connection, emulator, "PUT", path,
                                         {"x-ms-type": "file", "x-ms-content-length": "1"})
            assert response.status == 400
            assert error_code_of(body) == "InvalidResourceName"
    assert not list(Path(emulator.location).rglob("escape.txt"))


# --------------------------------------------------------------------------
# Rename
# --------------------------------------------------------------------------


def test_rename_file(share):
    directory = share.create_directory("ren")
    source = directory.upload_file("old name.txt", b"moving")
    file_id = source.get_file_properties().file_id
    renamed = source.rename_file("ren/new name é.txt")
    assert renamed.download_file().readall() == b"moving"
    assert renamed.get_file_properties().file_id == file_id
    with pytest.raises(ResourceNotFoundError):
        source.get_file_properties()

    other = directory.upload_file("other.txt", b"other")
    with pytest.raises(ResourceExistsError):
        other.rename_file("ren/new name é.txt")
    other.rename_file("ren/new name é.txt", overwrite=True)
    assert renamed.download_file().readall() == b"other"
    assert sorted(item.name for item in directory.list_directories_and_files()) == ["new name é.txt"]


def test_rename_directory(share):
    source = share.create_directory("src")
    source.create_subdirectory("child").upload_file("leaf.txt", b"leaf")
    file_id = source.get_directory_properties().file_id
    share.create_directory("dest-parent")

    moved = source.rename_directory("dest-parent/moved")
    assert moved.get_directory_properties().file_id == file_id
    assert share.get_file_client("dest-parent/moved/child/leaf.txt").download_file().readall() == b"leaf"
    with pytest.raises(ResourceNotFoundError):
        source.get_directory_properties()

    with pytest.raises(ResourceNotFoundError) as missing_parent:
        moved.rename_directory("nowhere/moved")
    assert missing_parent.value.error_code == "ParentNotFound"


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------


def test_wrong_key_is_rejected(emulator, share):
    bad_key_client = ShareServiceClient(emulator.account_url, credential=WRONG_KEY, retry_total=0)
    with pytest.raises(ClientAuthenticationError) as failed:
        bad_key_client.get_share_client(share.share_name).get_share_properties()
    assert failed.value.error_code == "AuthenticationFailed"

    bad_connection_string = emulator.connection_string.replace(ACCOUNT_KEY, WRONG_KEY)
    with pytest.raises(ClientAuthenticationError):
        ShareServiceClient.from_connection_string(bad_connection_string, retry_total=0).create_share("never")


def test_account_sas(emulator, share):
    share.get_file_client("sas.txt").upload_file(b"sas content")
    full = generate_account_sas(ACCOUNT_NAME, ACCOUNT_KEY, ResourceTypes(service=True, container=True, object=True),
                                AccountSasPermissions(read=True, write=True, list=True, create=True), expiry())
    client = ShareServiceClient(emulator.account_url, credential=full, retry_total=0)
    assert share.share_name in [item.name for item in client.list_shares()]
    sas_share = client.get_share_client(share.share_name)
    assert sas_share.get_file_client("sas.txt").download_file().readall() == b"sas content"
    sas_share.get_file_client("written-with-sas.txt").upload_file(b"ok")
    assert [item.name for item in sas_share.list_directories_and_files(name_starts_with="written")] == [
        "written-with-sas.txt"]

    read_only = generate_account_sas(ACCOUNT_NAME, ACCOUNT_KEY, ResourceTypes(object=True),
                                     AccountSasPermissions(read=True), expiry())
    limited = ShareServiceClient(emulator.account_url, credential=read_only, retry_total=0)
    limited_file = limited.get_share_client(share.share_name).get_file_client("sas.txt")
    assert limited_file.download_file().readall() == b"sas content"
    with pytest.raises(HttpResponseError) as denied:
        limited_file.upload_range(b"x", offset=0, length=1)
    assert denied.value.error_code == "AuthorizationPermissionMismatch"

    forged = generate_account_sas(ACCOUNT_NAME, WRONG_KEY, ResourceTypes(object=True),
                                  AccountSasPermissions(read=True), expiry())
    with pytest.raises(ClientAuthenticationError):
        ShareFileClient(emulator.account_url, share.share_name, "sas.txt", credential=forged,
                        retry_total=0).download_file().readall()

    expired = generate_account_sas(ACCOUNT_NAME, ACCOUNT_KEY, ResourceTypes(object=True),
                                   AccountSasPermissions(read=True), datetime.now(timezone.utc) - timedelta(minutes=5))
    with pytest.raises(ClientAuthenticationError):
        ShareFileClient(emulator.account_url, share.share_name, "sas.txt", credential=expired,
                        retry_total=0).download_file().readall()


def test_share_and_file_sas(emulator, share):
    share.create_directory("d").upload_file("f.txt", b"file sas")
    share_sas = generate_share_sas(ACCOUNT_NAME, share.share_name, ACCOUNT_KEY,
                                   ShareSasPermissions(read=True, list=True), expiry())
    sas_share = ShareClient(emulator.account_url, share.share_name, credential=share_sas, retry_total=0)
    assert [item.name for item in sas_share.list_directories_and_files("d")] == ["f.txt"]
    assert sas_share.get_file_client("d/f.txt").download_file().readall() == b"file sas"
    with pytest.raises(HttpResponseError) as denied:
        sas_share.get_file_client("d/new.txt").upload_file(b"no")
    assert denied.value.error_code == "AuthorizationPermissionMismatch"

    file_sas = generate_file_sas(ACCOUNT_NAME, share.share_name, ["d", "f.txt"], ACCOUNT_KEY,
                                 FileSasPermissions(read=True), expiry(), content_type="text/x-override")
    sas_file = ShareFileClient(emulator.account_url, share.share_name, "d/f.txt", credential=file_sas,
                               retry_total=0)
    downloaded = sas_file.download_file()
    assert downloaded.readall() == b"file sas"
    assert downloaded.properties.content_settings.content_type == "text/x-override"
    # A file SAS is bound to its path.
    with pytest.raises(ClientAuthenticationError):
        ShareFileClient(emulator.account_url, share.share_name, "d/other.txt", credential=file_sas,
                        retry_total=0).get_file_properties()


# --------------------------------------------------------------------------
# HTTPS and bearer tokens (Azure Files OAuth over REST)
# --------------------------------------------------------------------------


class StaticToken:
    """A TokenCredential that hands out one fixed token."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken
        return AccessToken(self.token, int(datetime.now(timezone.utc).timestamp()) + 3600)


@pytest.fixture(scope="module")
def tls_emulator(test_ca):
    with FileShareEmulator(certfile=test_ca.cert_path, keyfile=test_ca.key_path) as running:
        yield running


@pytest.fixture
def tls_share(tls_emulator, test_ca):
    service = ShareServiceClient.from_connection_string(tls_emulator.connection_string,
                                                        connection_verify=test_ca.ca_path, retry_total=0)
    client = service.create_share(f"tls-{uuid.uuid4().hex[:12]}")
    client.get_file_client("f.txt").upload_file(b"over tls")
    yield client
    client.delete_share()


def bearer_get(emulator, test_ca, path: str, token: str, headers=None):
    """GET `path` over HTTPS with a bearer token and exactly these extra headers."""
    sent = {"Authorization": f"Bearer {token}", "x-ms-date": formatdate(usegmt=True),
            "x-ms-version": "2025-05-05", "x-ms-file-request-intent": "backup"}
    sent.update(headers or {})
    sent = {name: value for name, value in sent.items() if value is not None}
    with closing(http.client.HTTPSConnection("127.0.0.1", emulator.port, timeout=10,
                                             context=test_ca.client_context())) as connection:
        connection.request("GET", path, headers=sent)
        response = connection.getresponse()
        return response, response.read()


def test_tls_serves_the_sdk_and_sas_bound_to_https(tls_emulator, tls_share, emulator, test_ca):
    assert tls_emulator.account_url.startswith("https://")
    assert tls_emulator.connection_string.startswith("DefaultEndpointsProtocol=https;")
    assert tls_share.get_file_client("f.txt").download_file().readall() == b"over tls"
    https_only = generate_share_sas(ACCOUNT_NAME, tls_share.share_name, ACCOUNT_KEY, ShareSasPermissions(read=True),
                                    expiry(), protocol="https")
    client = ShareFileClient(tls_emulator.account_url, tls_share.share_name, "f.txt", credential=https_only,
                             connection_verify=test_ca.ca_path, retry_total=0)
    assert client.download_file().readall() == b"over tls"
    # The same kind of SAS over plain HTTP is refused.
    plain = ShareServiceClient.from_connection_string(emulator.connection_string, retry_total=0)
    plain_share = plain.create_share(f"plain-{uuid.uuid4().hex[:12]}")
    try:
        plain_share.get_file_client("f.txt").upload_file(b"plain")
        sas = generate_share_sas(ACCOUNT_NAME, plain_share.share_name, ACCOUNT_KEY, ShareSasPermissions(read=True),
                                 expiry(), protocol="https")
        with pytest.raises(HttpResponseError) as refused:
            ShareFileClient(emulator.account_url, plain_share.share_name, "f.txt", credential=sas,
                            retry_total=0).download_file()
        assert refused.value.error_code == "AuthorizationProtocolMismatch"
    finally:
        plain_share.delete_share()


def test_tls_client_that_refuses_the_certificate_does_no_harm(tls_emulator, tls_share, test_ca, capfd):
    with socket.create_connection(("127.0.0.1", tls_emulator.port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            # The default trust store does not hold the test CA.
            ssl.create_default_context().wrap_socket(raw, server_hostname="127.0.0.1")
    with socket.create_connection(("127.0.0.1", tls_emulator.port), timeout=5) as raw:
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n")  # plain HTTP to a TLS port
        raw.recv(100)
    assert tls_share.get_file_client("f.txt").download_file().readall() == b"over tls"
    assert "Traceback" not in capfd.readouterr().err


@pytest.mark.parametrize("token,detail", [
    (storage_token(lifetime=-60, now=datetime.now(timezone.utc).timestamp() - 120), "expired"),
    (storage_token(now=datetime.now(timezone.utc).timestamp() + 600), "not yet valid"),
    (storage_token(audience="https://management.azure.com"), "Audience"),
    (storage_token(audience="https://otheraccount.file.core.windows.net"), "Audience"),
    (storage_token(issuer="https://login.example.com/tenant/"), "Issuer"),
    (storage_token(exp=None), "exp"),
    ("not.a.jwt", "malformed"),
    ("garbage", "malformed"),
], ids=["expired", "not-yet-valid", "wrong-audience", "other-account", "wrong-issuer", "no-exp", "bad-json",
        "not-a-jwt"])
def test_bearer_token_claims_are_checked(tls_emulator, tls_share, test_ca, token, detail):
    response, body = bearer_get(tls_emulator, test_ca, f"/{ACCOUNT_NAME}/{tls_share.share_name}/f.txt", token)
    assert response.status == 401 and error_code_of(body) == "InvalidAuthenticationInfo"
    assert detail in ET.fromstring(body).findtext("AuthenticationErrorDetail")
    challenge = response.getheader("WWW-Authenticate")
    assert challenge.startswith("Bearer authorization_uri=https://login.microsoftonline.com/")
    assert challenge.endswith("resource_id=https://storage.azure.com")


@pytest.mark.parametrize("audience", ["https://storage.azure.com", "https://storage.azure.com/",
                                      "e406a681-f3d4-42a8-90b6-c2b029497af1",
                                      f"https://{ACCOUNT_NAME}.file.core.windows.net"])
def test_bearer_storage_audiences_are_accepted(tls_emulator, tls_share, test_ca, audience):
    before = tls_emulator.bearer_accepted
    response, body = bearer_get(tls_emulator, test_ca, f"/{ACCOUNT_NAME}/{tls_share.share_name}/f.txt",
                                storage_token(audience=audience))
    assert response.status == 200 and body == b"over tls"
    assert tls_emulator.bearer_accepted == before + 1


def test_bearer_rules_of_intent_version_and_scheme(tls_emulator, tls_share, emulator, test_ca):
    path = f"/{ACCOUNT_NAME}/{tls_share.share_name}/f.txt"
    token = storage_token()
    response, body = bearer_get(tls_emulator, test_ca, path, token, {"x-ms-file-request-intent": None})
    assert response.status == 400 and error_code_of(body) == "MissingRequiredHeader"
    response, body = bearer_get(tls_emulator, test_ca, path, token, {"x-ms-file-request-intent": "restore"})
    assert response.status == 400 and error_code_of(body) == "InvalidHeaderValue"
    response, body = bearer_get(tls_emulator, test_ca, path, token, {"x-ms-version": "2022-08-01"})
    assert response.status == 403 and error_code_of(body) == "AuthenticationFailed"
    response, body = bearer_get(tls_emulator, test_ca, path, token, {"x-ms-version": "2022-11-02"})
    assert response.status == 200 and body == b"over tls"
    # Over plain HTTP a bearer token is refused whatever else is right.
    with closing(http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)) as connection:
        connection.request("GET", f"/{ACCOUNT_NAME}/anyshare/f.txt", headers={
            "Authorization": f"Bearer {token}", "x-ms-date": formatdate(usegmt=True),
            "x-ms-version": "2025-05-05", "x-ms-file-request-intent": "backup"})
        plain = connection.getresponse()
        assert plain.status == 403 and error_code_of(plain.read()) == "AuthenticationFailed"


def test_bearer_share_operations_need_2024_11_04(tls_emulator, tls_share, test_ca):
    token = StaticToken(storage_token())
    older = ShareServiceClient(tls_emulator.account_url, credential=token, token_intent="backup",
                               connection_verify=test_ca.ca_path, api_version="2024-08-04", retry_total=0)
    with pytest.raises(HttpResponseError) as refused:
        older.create_share(f"oauth-{uuid.uuid4().hex[:12]}")
    assert refused.value.status_code == 409
    assert refused.value.error_code == "FileOAuthManagementApiRestrictedToSrp"
    # Files and directories are fine at that version.
    older_share = older.get_share_client(tls_share.share_name)
    assert older_share.get_file_client("f.txt").download_file().readall() == b"over tls"
    older_share.create_directory("made-with-a-token")

    newer = ShareServiceClient(tls_emulator.account_url, credential=token, token_intent="backup",
                               connection_verify=test_ca.ca_path, api_version="2024-11-04", retry_total=0)
    made = newer.create_share(f"oauth-{uuid.uuid4().hex[:12]}")
    try:
        assert made.share_name in [item.name for item in newer.list_shares()]
    finally:
        made.delete_share()


def test_standalone_module_over_tls(tmp_path, test_ca):
    command = [sys.executable, "-m", "tests.emulators.fileshare", "--port", "0", "--location", str(tmp_path),
               "--cert", test_ca.cert_path, "--key", test_ca.key_path]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                assert selector.select(timeout=20), "emulator did not report its address"
            line = process.stdout.readline().strip()
            assert line.startswith("listening on https://127.0.0.1:"), line
            service = ShareServiceClient(line.removeprefix("listening on "), credential=ACCOUNT_KEY,
                                         connection_verify=test_ca.ca_path, retry_total=0)
            service.create_share("standalone")
            assert [item.name for item in service.list_shares()] == ["standalone"]
        finally:
            process.terminate()
            _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors


# --------------------------------------------------------------------------
# Wire protocol
# --------------------------------------------------------------------------


def test_response_headers_and_keep_alive(emulator, share):
    base = f"/{ACCOUNT_NAME}/{share.share_name}"
    with closing(http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)) as connection:
        created, _ = raw_request(connection, emulator, "PUT", f"{base}/wire.txt",
                                 {"x-ms-type": "file", "x-ms-content-length": "4", "x-ms-version": "2024-11-04"})
        assert created.status == 201
        socket_before = connection.sock
        # Same connection, several requests: keep-alive and Content-Length must be right.
        written, _ = raw_request(connection, emulator, "PUT", f"{base}/wire.txt?comp=range",
                                 {"x-ms-range": "bytes=0-3", "x-ms-write": "update"}, b"wire")
        head, head_body = raw_request(connection, emulator, "HEAD", f"{base}/wire.txt")
        got, got_body = raw_request(connection, emulator, "GET", f"{base}/wire.txt", {"x-ms-range": "bytes=1-2"})
        missing, missing_body = raw_request(connection, emulator, "GET", f"{base}/nope.txt")
        assert connection.sock is socket_before

    assert written.status == 201 and written.getheader("Content-MD5")
    assert head.status == 200 and head_body == b""
    assert head.getheader("Content-Length") == "4"
    assert head.getheader("x-ms-type") == "File"
    for name in ("x-ms-file-attributes", "x-ms-file-creation-time", "x-ms-file-last-write-time",
                 "x-ms-file-change-time", "x-ms-file-id", "x-ms-file-parent-id", "x-ms-file-permission-key",
                 "ETag", "Last-Modified"):
        assert head.getheader(name), name
    assert got.status == 206 and got_body == b"ir"
    assert got.getheader("Content-Range") == "bytes 1-2/4"
    assert missing.status == 404 and missing.getheader("x-ms-error-code") == "ResourceNotFound"
    assert error_code_of(missing_body) == "ResourceNotFound"
    assert missing_body.startswith(b'<?xml version="1.0" encoding="utf-8"?><Error><Code>')
    for response in (created, written, head, got, missing):
        assert response.getheader("x-ms-request-id")
        assert response.getheader("Date")
        assert response.getheader("Content-Length") is not None
    assert created.getheader("x-ms-version") == "2024-11-04"
    assert got.getheader("x-ms-version") == "2025-05-05"


def test_protocol_errors(emulator, share):
    base = f"/{ACCOUNT_NAME}/{share.share_name}"
    with closing(http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)) as connection:
        raw_request(connection, emulator, "PUT", f"{base}/small.bin",
                    {"x-ms-type": "file", "x-ms-content-length": "10"})
        beyond, _ = raw_request(connection, emulator, "GET", f"{base}/small.bin", {"x-ms-range": "bytes=10-20"})
        assert beyond.status == 416 and beyond.getheader("x-ms-error-code") == "InvalidRange"
        assert beyond.getheader("Content-Range") == "bytes */10"

        bad_header, body = raw_request(connection, emulator, "PUT", f"{base}/small.bin?comp=range",
                                       {"x-ms-range": "bytes=0-1", "x-ms-write": "sideways"}, b"ab")
        assert bad_header.status == 400 and error_code_of(body) == "InvalidHeaderValue"

        bad_query, body = raw_request(connection, emulator, "GET", f"{base}?restype=share&comp=bogus")
        assert bad_query.status == 400 and error_code_of(body) == "InvalidQueryParameterValue"

        forged, body = raw_request(connection, emulator, "GET", f"{base}?restype=share", key=WRONG_KEY)
        assert forged.status == 403 and error_code_of(body) == "AuthenticationFailed"

        connection.request("GET", f"{base}?restype=share")
        anonymous = connection.getresponse()
        anonymous.read()
        assert anonymous.status == 401

    with closing(http.client.HTTPConnection("127.0.0.1", emulator.port, timeout=10)) as connection:
        too_big = b"x" * (4 * MIB + 1)
        path = f"{base}/big.bin"
        raw_request(connection, emulator, "PUT", path, {"x-ms-type": "file", "x-ms-content-length": str(8 * MIB)})
        response, body = raw_request(connection, emulator, "PUT", f"{path}?comp=range",
                                     {"x-ms-range": f"bytes=0-{len(too_big) - 1}", "x-ms-write": "update"}, too_big)
        assert response.status == 413 and error_code_of(body) == "RequestBodyTooLarge"


def test_concurrent_uploads_to_one_share(share):
    def upload(index: int) -> bytes:
        data = payload(100_000 + index)
        share.get_file_client(f"concurrent-{index}.bin").upload_file(data)
        return data

    with ThreadPoolExecutor(max_workers=8) as pool:
        expected = list(pool.map(upload, range(16)))
    for index, data in enumerate(expected):
        assert share.get_file_client(f"concurrent-{index}.bin").download_file().readall() == data


# --------------------------------------------------------------------------
# Persistence and standalone use
# --------------------------------------------------------------------------


def test_state_survives_restart(tmp_path):
    with FileShareEmulator(location=str(tmp_path)) as first:
        service = ShareServiceClient.from_connection_string(first.connection_string, retry_total=0)
        client = service.create_share("persist").create_directory("d").upload_file("f.txt", b"kept",
                                                                                     metadata={"k": "v"})
        before = client.get_file_properties()
    with FileShareEmulator(location=str(tmp_path)) as second:
        service = ShareServiceClient.from_connection_string(second.connection_string, retry_total=0)
        client = service.get_share_client("persist").get_file_client("d/f.txt")
        after = client.get_file_properties()
        assert client.download_file().readall() == b"kept"
    assert (after.etag, after.file_id, after.metadata) == (before.etag, before.file_id, {"k": "v"})
    assert tmp_path.exists()  # a location passed in is not removed


def test_standalone_module(tmp_path):
    command = [sys.executable, "-m", "tests.emulators.fileshare", "--port", "0", "--location", str(tmp_path)]
    with subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as process:
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(process.stdout, selectors.EVENT_READ)
                assert selector.select(timeout=20), "emulator did not report its address"
            line = process.stdout.readline().strip()
            assert line.startswith("listening on http://127.0.0.1:"), line
            account_url = line.removeprefix("listening on ")
            assert account_url.endswith(f"/{ACCOUNT_NAME}")

            service = ShareServiceClient(account_url, credential=ACCOUNT_KEY, retry_total=0)
            service.create_share("standalone")
            assert [item.name for item in service.list_shares()] == ["standalone"]
            assert (tmp_path / "shares" / "standalone").is_dir()
        finally:
            process.terminate()
            _, errors = process.communicate(timeout=10)
    assert process.returncode == 0, errors
