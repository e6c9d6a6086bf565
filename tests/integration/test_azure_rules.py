"""The gateway that refuses what Azure refuses (tests/support/azure_rules.py),
driven with the SDK: what it lets through reaches Azurite unchanged, and
each copy Azure would refuse is refused with the answer Azure gives."""

import hashlib
import os
import time
from datetime import datetime, timedelta, timezone

import pytest
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import (BlobBlock, BlobSasPermissions, BlobServiceClient, ContainerSasPermissions,
                                generate_blob_sas, generate_container_sas)

from tests.support.azure_rules import SYNC_COPY_MAX, AzureRules, make_certificate, put_large_blob
from tests.support.azurite import ACCOUNT, KEY

pytestmark = pytest.mark.azurite


@pytest.fixture
def gateway(azurite):
    with AzureRules(azurite.port) as g:
        yield g


def through(gateway, azurite, container, credential=None, **options):
    """The test container as seen through the gateway."""
    service = BlobServiceClient(gateway.url(azurite.account_url),
                                credential=credential or {"account_name": ACCOUNT, "account_key": KEY}, **options)
    return service.get_container_client(container.container_name)


def blob_sas(container, name: str, **permissions) -> str:
    return generate_blob_sas(ACCOUNT, container.container_name, name, account_key=KEY,
                             permission=BlobSasPermissions(**(permissions or {"read": True})),
                             expiry=datetime.now(timezone.utc) + timedelta(hours=1))


def refusal(call) -> HttpResponseError:
    with pytest.raises(HttpResponseError) as e:
        call()
    return e.value


def test_everything_else_passes_through(gateway, azurite, container):
    via = through(gateway, azurite, container, max_single_put_size=1 << 20, max_block_size=1 << 20)
    small, large = os.urandom(1000), os.urandom(5 * 1024 * 1024 + 3)  # large: staged blocks and a block list
    via.upload_blob("dir/small.bin", small)
    via.upload_blob("dir/large.bin", large, max_concurrency=2)
    assert via.download_blob("dir/large.bin").readall() == large
    assert via.download_blob("dir/large.bin", offset=4096, length=10).readall() == large[4096:4106]
    assert container.download_blob("dir/small.bin").readall() == small  # as Azurite holds it
    assert sorted(b.name for b in via.list_blobs()) == ["dir/large.bin", "dir/small.bin"]
    assert via.get_blob_client("dir/small.bin").get_blob_properties().size == len(small)
    via.delete_blob("dir/small.bin")
    assert [b.name for b in container.list_blobs()] == ["dir/large.bin"]
    assert gateway.copies == []


def test_blob_names_azure_refuses_are_refused(gateway, azurite, container):
    via = through(gateway, azurite, container)
    via.upload_blob("n" * 1024, b"longest")  # at the limits: taken
    via.upload_blob("/".join(["d"] * 254), b"deepest")
    for name in ("n" * 1025, "/".join(["d"] * 255)):
        e = refusal(lambda: via.upload_blob(name, b"x"))  # noqa: B023 - called at once
        assert e.status_code == 400 and e.error_code == "InvalidResourceName"
    assert sorted(b.name for b in container.list_blobs()) == sorted(["n" * 1024, "/".join(["d"] * 254)])


def test_synchronous_copy_reads_its_source_only_with_a_sas_or_token(gateway, azurite, container):
    container.upload_blob("src.bin", b"source bytes")
    via = through(gateway, azurite, container)
    source = via.get_blob_client("src.bin")
    e = refusal(lambda: via.get_blob_client("dst.bin").start_copy_from_url(source.url, requires_sync=True))
    # The request's own Shared Key says nothing about the source: read
    # anonymously, a private blob does not exist.
    assert (e.status_code, e.error_code) == (404, "CannotVerifyCopySource")
    assert e.response.headers["x-ms-copy-source-status-code"] == "404"
    assert e.response.headers["x-ms-copy-source-error-code"] == "ResourceNotFound"
    assert "<CopySourceStatusCode>404</CopySourceStatusCode>" in e.response.text()
    assert "dst.bin" not in {b.name for b in container.list_blobs()}
    e = refusal(lambda: via.get_blob_client("dst.bin").start_copy_from_url(
        source.url, requires_sync=True, source_authorization="Bearer not-a-token-of-this-account"))
    assert (e.status_code, e.error_code) == (401, "CannotVerifyCopySource")
    e = refusal(lambda: via.get_blob_client("dst.bin").start_copy_from_url(
        f"{source.url}?{blob_sas(container, 'src.bin', write=True)}", requires_sync=True))
    assert (e.status_code, e.error_code) == (403, "CannotVerifyCopySource")  # a SAS that may not read
    done = via.get_blob_client("dst.bin").start_copy_from_url(f"{source.url}?{blob_sas(container, 'src.bin')}",
                                                              requires_sync=True)
    assert done["copy_status"] == "success"
    assert container.download_blob("dst.bin").readall() == b"source bytes"
    assert [(c["op"], c["source_sas"], c["answer"]) for c in gateway.copies] == [
        ("copy-from-url", False, "404 CannotVerifyCopySource"), ("copy-from-url", False, "401 CannotVerifyCopySource"),
        ("copy-from-url", True, "403 CannotVerifyCopySource"), ("copy-from-url", True, "forwarded")]


def test_put_block_from_url_reads_its_source_only_with_a_sas(gateway, azurite, container):
    data = os.urandom(300_000)
    container.upload_blob("src.bin", data)
    via = through(gateway, azurite, container)
    source, target = via.get_blob_client("src.bin"), via.get_blob_client("dst.bin")
    e = refusal(lambda: target.stage_block_from_url("YmxvY2stMA==", source.url, source_offset=0, source_length=1000))
    assert (e.status_code, e.error_code) == (404, "CannotVerifyCopySource")
    signed = f"{source.url}?{blob_sas(container, 'src.bin')}"
    target.stage_block_from_url("YmxvY2stMA==", signed, source_offset=0, source_length=100_000)
    target.stage_block_from_url("YmxvY2stMQ==", signed, source_offset=100_000, source_length=200_000)
    target.commit_block_list([BlobBlock("YmxvY2stMA=="), BlobBlock("YmxvY2stMQ==")])
    assert container.download_blob("dst.bin").readall() == data
    assert [(c["op"], c["answer"]) for c in gateway.copies] == [
        ("block-from-url", "404 CannotVerifyCopySource"), ("block-from-url", "forwarded"),
        ("block-from-url", "forwarded")]


def test_synchronous_copy_takes_sources_of_up_to_256_mib(gateway, azurite, container):
    md5 = put_large_blob(container, "big.bin", SYNC_COPY_MAX + 1)
    put_large_blob(container, "at-limit.bin", SYNC_COPY_MAX)
    via = through(gateway, azurite, container)
    source = via.get_blob_client("big.bin")
    e = refusal(lambda: via.get_blob_client("copy.bin").start_copy_from_url(
        f"{source.url}?{blob_sas(container, 'big.bin')}", requires_sync=True))
    assert (e.status_code, e.error_code) == (409, "CannotVerifyCopySource")
    at_limit = f"{via.get_blob_client('at-limit.bin').url}?{blob_sas(container, 'at-limit.bin')}"
    assert via.get_blob_client("copy.bin").start_copy_from_url(at_limit, requires_sync=True)["copy_status"] == "success"
    # The asynchronous copy has no such limit.
    assert via.get_blob_client("copy.bin").start_copy_from_url(source.url)["copy_status"] == "success"
    assert bytes(container.get_blob_client("copy.bin").get_blob_properties().content_settings.content_md5) == md5


def test_asynchronous_copy_reads_a_source_in_the_account_with_the_request_credential(gateway, azurite, container):
    container.upload_blob("src.bin", b"source bytes")
    with_key = through(gateway, azurite, container)
    plain_url = with_key.get_blob_client("src.bin").url
    assert with_key.get_blob_client("a.bin").start_copy_from_url(plain_url)["copy_status"] == "success"
    # A SAS on the request covers only the destination.
    sas = generate_container_sas(ACCOUNT, container.container_name, account_key=KEY,
                                 permission=ContainerSasPermissions(read=True, write=True, create=True),
                                 expiry=datetime.now(timezone.utc) + timedelta(hours=1))
    with_sas = through(gateway, azurite, container, credential=sas)
    e = refusal(lambda: with_sas.get_blob_client("b.bin").start_copy_from_url(plain_url))
    assert (e.status_code, e.error_code) == (404, "CannotVerifyCopySource")
    source_with_sas = with_sas.get_blob_client("src.bin").url  # the SDK's URLs carry its SAS
    assert "sig=" in source_with_sas
    assert with_sas.get_blob_client("b.bin").start_copy_from_url(source_with_sas)["copy_status"] == "success"
    # A source in another account is read anonymously, whatever the request carries.
    elsewhere = plain_url.replace(f"/{ACCOUNT}/", "/otheraccount/")
    e = refusal(lambda: with_key.get_blob_client("c.bin").start_copy_from_url(elsewhere))
    assert (e.status_code, e.error_code) == (404, "CannotVerifyCopySource")
    assert sorted(b.name for b in container.list_blobs()) == ["a.bin", "b.bin", "src.bin"]
    assert [(c["op"], c["auth"], c["answer"]) for c in gateway.copies] == [
        ("copy", "SharedKey", "forwarded"), ("copy", "SAS", "404 CannotVerifyCopySource"),
        ("copy", "SAS", "forwarded"), ("copy", "SharedKey", "404 CannotVerifyCopySource")]


class Token:
    def __init__(self, token):
        self.token = token

    def get_token(self, *scopes, **kwargs):
        from azure.core.credentials import AccessToken
        return AccessToken(self.token, int(time.time()) + 3600)


def test_bearer_tokens_over_https(azurite, container, tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    ca, cert, key = make_certificate(tmp_path)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", ca)
    with AzureRules(azurite.port, tokens={"good"}, tls=(cert, key)) as gateway:
        assert gateway.url(azurite.account_url).startswith("https://")
        via = through(gateway, azurite, container, credential=Token("good"))
        data = os.urandom(10_000)
        via.upload_blob("a.bin", data)
        assert via.download_blob("a.bin").readall() == data
        assert container.download_blob("a.bin").readall() == data
        source = via.get_blob_client("a.bin").url
        assert via.get_blob_client("b.bin").start_copy_from_url(source)["copy_status"] == "success"
        e = refusal(lambda: via.get_blob_client("c.bin").start_copy_from_url(source, requires_sync=True))
        assert (e.status_code, e.error_code) == (404, "CannotVerifyCopySource")
        via.get_blob_client("c.bin").start_copy_from_url(source, requires_sync=True, source_authorization="Bearer good")
        e = refusal(lambda: through(gateway, azurite, container, credential=Token("bad")).download_blob("a.bin"))
        assert (e.status_code, e.error_code) == (401, "InvalidAuthenticationInfo")
        assert [(c["op"], c["auth"], c["source_authorization"], c["answer"]) for c in gateway.copies] == [
            ("copy", "Bearer", None, "forwarded"), ("copy-from-url", "Bearer", None, "404 CannotVerifyCopySource"),
            ("copy-from-url", "Bearer", "Bearer", "forwarded")]
    assert sorted(b.name for b in container.list_blobs()) == ["a.bin", "b.bin", "c.bin"]


def test_copies_that_take_time(azurite, container):
    container.upload_blob("src.bin", b"source bytes")
    with AzureRules(azurite.port, pending_polls=2) as gateway:
        via = through(gateway, azurite, container)
        source = via.get_blob_client("src.bin").url
        target = via.get_blob_client("a.bin")
        started = target.start_copy_from_url(source)
        assert started["copy_status"] == "pending"
        seen = [target.get_blob_properties().copy for _ in range(3)]
        assert [c.status for c in seen] == ["pending", "pending", "success"]
        assert {c.id for c in seen} == {started["copy_id"]}
        other = via.get_blob_client("b.bin")
        started = other.start_copy_from_url(source)
        other.abort_copy(started["copy_id"])
        assert other.get_blob_properties().copy.status == "aborted"
        with pytest.raises(HttpResponseError):
            other.abort_copy(started["copy_id"])  # nothing pending any more: Azurite answers


def test_a_failed_copy_reports_failed(azurite, container):
    container.upload_blob("src.bin", b"source bytes")
    with AzureRules(azurite.port, pending_polls=1, copy_outcome="failed") as gateway:
        via = through(gateway, azurite, container)
        target = via.get_blob_client("a.bin")
        target.start_copy_from_url(via.get_blob_client("src.bin").url)
        assert target.get_blob_properties().copy.status == "pending"
        copy = target.get_blob_properties().copy
        assert copy.status == "failed" and copy.status_description.startswith("500")


def test_large_blob_helper(container):
    size = 9 * 1024 * 1024 + 5
    md5 = put_large_blob(container, "x.bin", size, "text/x-test", piece=2 * 1024 * 1024)
    data = container.download_blob("x.bin").readall()
    props = container.get_blob_client("x.bin").get_blob_properties()
    assert len(data) == size and hashlib.md5(data).digest() == md5
    assert bytes(props.content_settings.content_md5) == md5 and props.content_settings.content_type == "text/x-test"
