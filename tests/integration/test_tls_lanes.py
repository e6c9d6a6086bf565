"""The TLS, OAuth and proxy lanes work before mountd is put on them: the
fixtures of tests/conftest.py driven with the Azure SDK directly (not
mountd's storage code), each check one a broken fixture would fail.

HTTPS with the account key and with managed-identity tokens against strict
Azurite instances, the certificate refused where the test CA is not
trusted, Azurite's token checks, the token endpoint's protocol, records
and scripted faults, the proxy's tunnels, plain forwarding and
credentials, and the Files emulator's bearer rules at the wire."""

from __future__ import annotations

import socket
import time
import uuid
from email.utils import formatdate

import pytest
import requests
from azure.core.credentials import AccessToken
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ServiceRequestError
from azure.identity import ManagedIdentityCredential
from azure.storage.blob import BlobServiceClient
from azure.storage.fileshare import ShareClient, ShareServiceClient

from tests.emulators.fileshare import OAUTH_MIN_VERSION
from tests.support.azurite import ACCOUNT, KEY, SDK_API_VERSION
from tests.support.identity import STORAGE_RESOURCE, decode_jwt, storage_token
from tests.support.proxy import ConnectProxy
from tests.support.remotes import datastore_entry

pytestmark = pytest.mark.azurite

STORAGE_SCOPE = "https://storage.azure.com/.default"
FILE_API_VERSION = "2025-05-05"


class StaticToken:
    """A TokenCredential that hands out one fixed token."""

    def __init__(self, token: str):
        self.token = token

    def get_token(self, *scopes, **kwargs) -> AccessToken:
        return AccessToken(self.token, int(time.time()) + 3600)


def round_trip(service: BlobServiceClient) -> tuple[bytes, bytes]:
    """Create a container, store a blob, read it back, clean up: (sent, got)."""
    container = service.get_container_client(f"t{uuid.uuid4().hex[:16]}")
    container.create_container()
    try:
        data = uuid.uuid4().bytes * 1000
        container.upload_blob("dir/blob.bin", data)
        return data, container.download_blob("dir/blob.bin").readall()
    finally:
        container.delete_container()


# ----- the CA and HTTPS with the account key ------------------------------------------------


def test_azurite_over_https_with_the_key(azurite_tls, test_ca):
    assert azurite_tls.account_url.startswith("https://127.0.0.1:")
    service = BlobServiceClient(azurite_tls.account_url, credential={"account_name": ACCOUNT, "account_key": KEY},
                                connection_verify=test_ca.ca_path, api_version=SDK_API_VERSION)
    sent, got = round_trip(service)
    assert got == sent


def test_without_the_ca_the_certificate_is_refused(azurite_tls):
    # The default trust store (the system's) does not know the test CA.
    service = BlobServiceClient(azurite_tls.account_url, credential={"account_name": ACCOUNT, "account_key": KEY},
                                api_version=SDK_API_VERSION, retry_total=0)
    with pytest.raises(ServiceRequestError, match="CERTIFICATE_VERIFY_FAILED"):
        service.get_service_properties()


def test_trust_test_ca_is_the_environment_way_in(azurite_tls, trust_test_ca):
    # No connection_verify: requests takes REQUESTS_CA_BUNDLE, as mountd's
    # clients and child processes would.
    service = BlobServiceClient(azurite_tls.account_url, credential={"account_name": ACCOUNT, "account_key": KEY},
                                api_version=SDK_API_VERSION, retry_total=0)
    assert service.get_service_properties() is not None
    # And Python's ssl module takes SSL_CERT_FILE.
    import ssl
    with socket.create_connection(("127.0.0.1", azurite_tls.port)) as raw, \
            ssl.create_default_context().wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version().startswith("TLS")


def test_strict_azurite_refuses_an_api_version_it_does_not_know(azurite_tls, test_ca):
    # The SDK's default version is newer than Azurite's newest: the reason
    # the plain instance runs with --skipApiVersionCheck, and blob_service()
    # pins SDK_API_VERSION.
    service = BlobServiceClient(azurite_tls.account_url, credential={"account_name": ACCOUNT, "account_key": KEY},
                                connection_verify=test_ca.ca_path, retry_total=0)
    assert service.api_version > SDK_API_VERSION
    with pytest.raises(HttpResponseError) as caught:
        service.get_service_properties()
    assert caught.value.status_code == 400 and "API version" in str(caught.value)
    assert azurite_tls.blob_service().get_service_properties() is not None


# ----- tokens: the identity endpoint and Azurite --oauth --------------------------------------


def test_azurite_over_https_with_a_managed_identity_token(azurite_oauth, identity_endpoint, test_ca):
    credential = ManagedIdentityCredential()
    service = BlobServiceClient(azurite_oauth.account_url, credential=credential,
                                connection_verify=test_ca.ca_path, api_version=SDK_API_VERSION)
    sent, got = round_trip(service)
    assert got == sent
    # One token served every request (the credential caches it), asked for
    # the system-assigned identity and storage's resource.
    assert identity_endpoint.tokens_issued == 1
    assert identity_endpoint.client_ids == [None]
    assert identity_endpoint.requests[0].resource == STORAGE_RESOURCE
    claims = decode_jwt(identity_endpoint.tokens[0])
    assert claims["aud"] == STORAGE_RESOURCE and claims["iss"].startswith("https://sts.windows.net/")
    assert claims["nbf"] <= time.time() < claims["exp"]


def test_a_user_assigned_identity_is_asked_for_by_client_id(azurite_oauth, identity_endpoint):
    service = azurite_oauth.blob_service(ManagedIdentityCredential(client_id="1d3a0000-0000-4000-8000-00000000beef"))
    assert service.get_service_properties() is not None
    assert identity_endpoint.client_ids == ["1d3a0000-0000-4000-8000-00000000beef"]
    assert decode_jwt(identity_endpoint.tokens[0])["appid"] == "1d3a0000-0000-4000-8000-00000000beef"


@pytest.mark.parametrize("token", [
    pytest.param("garbage", id="not-a-jwt"),
    pytest.param(storage_token(lifetime=-60, now=time.time() - 120), id="expired"),
    pytest.param(storage_token(audience="https://management.azure.com"), id="wrong-audience"),
    pytest.param(storage_token(issuer="https://evil.example/"), id="wrong-issuer"),
])
def test_azurite_oauth_refuses_bad_tokens(azurite_oauth, token):
    service = azurite_oauth.blob_service(StaticToken(token), retry_total=0)
    with pytest.raises(ClientAuthenticationError) as caught:
        service.get_service_properties()
    assert caught.value.status_code == 403 and caught.value.error_code == "AuthenticationFailed"


def test_azurite_oauth_takes_a_good_token_as_the_control(azurite_oauth):
    # The same path as the refusals above, with a token it must accept.
    assert azurite_oauth.blob_service(StaticToken(storage_token()), retry_total=0).get_service_properties()


def test_identity_endpoint_refuses_without_the_secret_header(identity_endpoint):
    for headers in ({}, {"X-IDENTITY-HEADER": "wrong"}):
        r = requests.get(identity_endpoint.url, params={"api-version": "2019-08-01", "resource": STORAGE_RESOURCE},
                         headers=headers, timeout=5)
        assert r.status_code == 401 and "access_token" not in r.json()
    assert identity_endpoint.refused == 2 and identity_endpoint.tokens_issued == 0
    r = requests.get(identity_endpoint.url, params={"api-version": "2019-08-01", "resource": STORAGE_RESOURCE},
                     headers={"X-IDENTITY-HEADER": identity_endpoint.secret}, timeout=5)
    body = r.json()
    assert r.status_code == 200 and body["token_type"] == "Bearer" and body["resource"] == STORAGE_RESOURCE
    assert int(body["expires_on"]) > time.time() + 3000
    assert identity_endpoint.tokens_issued == 1


def test_identity_endpoint_scripted_failure_is_retried_by_the_credential(identity_endpoint):
    identity_endpoint.fail_next(1, status=500)
    token = ManagedIdentityCredential().get_token(STORAGE_SCOPE)
    assert [r.status for r in identity_endpoint.requests] == [500, 200]
    assert token.token == identity_endpoint.tokens[0]


def test_identity_endpoint_stall_outlasts_a_read_timeout(identity_endpoint):
    identity_endpoint.stall_next(1, seconds=30)
    started = time.monotonic()
    ManagedIdentityCredential(read_timeout=0.5).get_token(STORAGE_SCOPE)
    # The stalled request timed out, the retry got the token; the stall was
    # not waited out.
    assert time.monotonic() - started < 10
    assert len(identity_endpoint.requests) == 2 and identity_endpoint.tokens_issued == 1
    identity_endpoint.release()


# ----- the proxy -------------------------------------------------------------------------


def test_sdk_tunnels_https_through_the_proxy(azurite_tls, connect_proxy, monkeypatch):
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    service = azurite_tls.blob_service(proxies={"https": connect_proxy.url})
    sent, got = round_trip(service)
    assert got == sent
    connects = connect_proxy.records("CONNECT")
    assert connects and {r.target for r in connects} == {f"127.0.0.1:{azurite_tls.port}"}
    assert all(r.status == 200 and r.path is None for r in connects)
    assert not connect_proxy.records("PUT")  # nothing went around the tunnel in the clear


def test_proxy_forwards_plain_http_and_logs_paths(azurite, connect_proxy):
    service = BlobServiceClient(azurite.account_url, credential={"account_name": ACCOUNT, "account_key": KEY},
                                proxies={"http": connect_proxy.url})
    sent, got = round_trip(service)
    assert got == sent
    puts = connect_proxy.records("PUT")
    assert any(r.path.startswith(f"/{ACCOUNT}/") and r.path.split("?")[0].endswith("/dir/blob.bin") for r in puts)
    assert all(r.target == f"127.0.0.1:{azurite.port}" for r in connect_proxy.records())
    assert not connect_proxy.records("CONNECT")


def test_proxy_credentials_are_demanded(azurite_tls):
    with ConnectProxy(auth=("user", "s3cret")) as proxy:
        anonymous = azurite_tls.blob_service(proxies={"https": proxy.bare_url}, retry_total=0)
        with pytest.raises(ServiceRequestError, match="407"):
            anonymous.get_service_properties()
        assert azurite_tls.blob_service(proxies={"https": proxy.url}, retry_total=0).get_service_properties()
        assert [r.status for r in proxy.records("CONNECT")] == [407, 200]


def test_proxy_refuses_other_than_loopback_and_stops(connect_proxy):
    with socket.create_connection(("127.0.0.1", connect_proxy.port), timeout=5) as s:
        s.sendall(b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n")
        assert s.recv(100).startswith(b"HTTP/1.1 403")
    port = connect_proxy.port
    connect_proxy.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


# ----- the Files emulator and bearer tokens --------------------------------------------------


@pytest.fixture
def tls_share(fileshare_tls, test_ca):
    """A share of the HTTPS Files emulator, made with the key, holding file `f`."""
    service = ShareServiceClient.from_connection_string(fileshare_tls.connection_string,
                                                        connection_verify=test_ca.ca_path)
    share = service.create_share(f"t{uuid.uuid4().hex[:16]}")
    share.get_file_client("f").upload_file(b"file data")
    yield share
    share.delete_share()


def raw_file_get(emulator, share: str, headers: dict, verify) -> requests.Response:
    """GET file `f` with exactly these headers (and a date): the SDK would
    refuse to send some of the requests the tests need."""
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": FILE_API_VERSION, **headers}
    return requests.get(f"{emulator.account_url}/{share}/f", headers=headers, verify=verify, timeout=10)


def test_files_take_a_bearer_with_backup_intent_over_https(fileshare_tls, tls_share, identity_endpoint, test_ca):
    before = fileshare_tls.bearer_accepted
    client = ShareClient(fileshare_tls.account_url, tls_share.share_name, credential=ManagedIdentityCredential(),
                         token_intent="backup", connection_verify=test_ca.ca_path)
    assert client.get_file_client("f").download_file().readall() == b"file data"
    client.get_file_client("g").upload_file(b"written with a token")
    assert tls_share.get_file_client("g").download_file().readall() == b"written with a token"
    assert fileshare_tls.bearer_accepted > before and identity_endpoint.tokens_issued == 1


def test_files_refuse_a_bearer_without_intent(fileshare_tls, tls_share, test_ca):
    auth = {"Authorization": f"Bearer {storage_token()}"}
    r = raw_file_get(fileshare_tls, tls_share.share_name, auth, test_ca.ca_path)
    assert r.status_code == 400 and r.headers["x-ms-error-code"] == "MissingRequiredHeader"
    assert "x-ms-file-request-intent" in r.text
    r = raw_file_get(fileshare_tls, tls_share.share_name, {**auth, "x-ms-file-request-intent": "backup"},
                     test_ca.ca_path)
    assert r.status_code == 200 and r.content == b"file data"


def test_files_refuse_a_bearer_over_plain_http(fileshare):
    # The plain-HTTP emulator, the same request that is fine over HTTPS.
    service = ShareServiceClient.from_connection_string(fileshare.connection_string)
    share = service.create_share(f"t{uuid.uuid4().hex[:16]}")
    try:
        share.get_file_client("f").upload_file(b"file data")
        r = raw_file_get(fileshare, share.share_name, {"Authorization": f"Bearer {storage_token()}",
                                                        "x-ms-file-request-intent": "backup"}, True)
        assert r.status_code == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
        assert "not allowed with HTTP" in r.text
        # The SDK does not even make a token client for an http URL.
        with pytest.raises(ValueError, match="HTTPS"):
            ShareClient(fileshare.account_url, share.share_name, credential=StaticToken(storage_token()),
                        token_intent="backup")
    finally:
        share.delete_share()


def test_files_bearer_needs_api_version_2022_11_02(fileshare_tls, tls_share, test_ca):
    headers = {"Authorization": f"Bearer {storage_token()}", "x-ms-file-request-intent": "backup"}
    r = raw_file_get(fileshare_tls, tls_share.share_name, {**headers, "x-ms-version": "2021-12-02"}, test_ca.ca_path)
    assert r.status_code == 403 and r.headers["x-ms-error-code"] == "AuthenticationFailed"
    r = raw_file_get(fileshare_tls, tls_share.share_name, {**headers, "x-ms-version": OAUTH_MIN_VERSION},
                     test_ca.ca_path)
    assert r.status_code == 200


# ----- workspace entries ---------------------------------------------------------------------


def test_datastore_entries_for_each_lane(azurite_tls, azurite_oauth, fileshare_tls):
    from mountd.config.datastores import parse
    entry = datastore_entry(azurite_tls, "cont1", "MY_KEY")
    assert entry == {"type": "azure_blob", "account_name": ACCOUNT, "container_name": "cont1",
                     "endpoint": azurite_tls.account_url, "credential": {"account_key_env": "MY_KEY"}}
    assert entry["endpoint"].startswith("https://")
    entry = datastore_entry(azurite_oauth, "cont2", managed_identity=True)
    assert entry["credential"] == {"managed_identity": True}
    assert parse("blob", entry, "test").account_url() == azurite_oauth.account_url
    entry = datastore_entry(fileshare_tls, "share1", client_id="abc")
    assert entry["type"] == "azure_file" and entry["share_name"] == "share1"
    assert entry["endpoint"] == fileshare_tls.account_url and entry["endpoint"].startswith("https://")
    assert entry["credential"] == {"managed_identity": True, "client_id": "abc"}
    assert parse("files", entry, "test").credential == {"managed_identity": True, "client_id": "abc"}
