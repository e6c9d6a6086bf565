"""Tokens for datastores (mountd.storage.identity): which credential each
kind uses, retries of a failing token endpoint, and how failures surface.

azure-identity talks to a real HTTP server here: a managed identity endpoint
in the App Service style (IDENTITY_ENDPOINT + IDENTITY_HEADER) or the IMDS
style (AZURE_POD_IDENTITY_AUTHORITY_HOST moves IMDS's address), answering
from a script.
"""

from __future__ import annotations

import errno
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest

from mountd.config import credentials
from mountd.config.credentials import require_https
from mountd.config.datastores import parse
from mountd.errors import ConfigError, StorageError, TokenUnavailable
from mountd.fs.errors import FsError, errno_for
from mountd.storage import open_store
from mountd.storage.identity import token_credential
from tests.support.azurite import free_port

SCOPE = "https://storage.azure.com/.default"
TOKEN = "eyJ0eXAiOiJKV1QiLCJhbGciOiJub25lIn0.test-token"
HEADER_SECRET = "identity-header-SECRET-4f1c"
IDENTITY_VARIABLES = (
    "IDENTITY_ENDPOINT", "IDENTITY_HEADER", "IDENTITY_SERVER_THUMBPRINT", "IMDS_ENDPOINT", "MSI_ENDPOINT",
    "MSI_SECRET", "AZURE_POD_IDENTITY_AUTHORITY_HOST", "AZURE_CLIENT_ID", "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID", "AZURE_AUTHORITY_HOST", "AZURE_FEDERATED_TOKEN_FILE", "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_USERNAME", "AZURE_PASSWORD", "AZURE_TOKEN_CREDENTIALS")


class TokenEndpoint:
    """A local token endpoint. Each request takes the next answer of
    `script`, then `then`: "ok" (a token), "refuse" (400, as IMDS answers
    when the node has no such identity), a status number (an error answer),
    "stall" (no answer until the test ends)."""

    def __init__(self, script=(), then="ok", retry_after: str | None = None):
        self.script, self.then, self.retry_after = list(script), then, retry_after
        self.requests: list[tuple[str, dict, dict]] = []  # (path, query, headers)
        self.release = threading.Event()
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                parts = urlsplit(self.path)
                endpoint.requests.append((parts.path, parse_qs(parts.query), dict(self.headers)))
                answer = endpoint.script.pop(0) if endpoint.script else endpoint.then
                if answer == "stall":
                    endpoint.release.wait(30)
                    return
                if answer == "ok":
                    now = int(time.time())
                    body = {"access_token": TOKEN, "expires_in": "3600", "expires_on": str(now + 3600),
                            "resource": "https://storage.azure.com", "token_type": "Bearer"}
                    self._send(200, body)
                elif answer == "refuse":
                    self._send(400, {"error": "invalid_request",
                                     "error_description": "Identity not found"})
                else:
                    self._send(int(answer), {"error": "busy", "error_description": "try again"})

            def _send(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status != 200 and endpoint.retry_after is not None:
                    self.send_header("Retry-After", endpoint.retry_after)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def stop(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def env(monkeypatch, tmp_path):
    """No identity of this machine or user leaks in: no AZURE_*/identity
    variables, IMDS moved to a closed local port, no CLI on PATH, an empty
    HOME; a short retry budget."""
    for name in IDENTITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setenv("MOUNTD_STORAGE_RETRIES", "3")
    monkeypatch.setenv("MOUNTD_STORAGE_BACKOFF", "0.01")
    monkeypatch.setenv("MOUNTD_STORAGE_READ_TIMEOUT", "0.5")
    monkeypatch.setenv("MOUNTD_STORAGE_CONNECT_TIMEOUT", "1")
    return monkeypatch


@pytest.fixture
def endpoints():
    made = []

    def make(*args, **kwargs):
        made.append(TokenEndpoint(*args, **kwargs))
        return made[-1]
    yield make
    for endpoint in made:
        endpoint.stop()


def app_service(env, endpoint):
    env.setenv("IDENTITY_ENDPOINT", endpoint.url + "/msi/token")
    env.setenv("IDENTITY_HEADER", HEADER_SECRET)


def imds(env, endpoint):
    env.setenv("AZURE_POD_IDENTITY_AUTHORITY_HOST", endpoint.url)


def credential(spec=None, name="ds"):
    return token_credential(credentials.resolve(spec if spec is not None else {"managed_identity": True},
                                                f"datastore {name!r}"))


def check_message(e, *fragments):
    message = str(e)
    assert "\n" not in message and HEADER_SECRET not in message and TOKEN not in message
    for fragment in fragments:
        assert fragment in message


# -- which credential ----------------------------------------------------------------
@pytest.mark.parametrize("flavor", [app_service, imds])
def test_managed_identity_gets_the_token_from_the_node_endpoint(env, endpoints, flavor):
    endpoint = endpoints()
    flavor(env, endpoint)
    token = credential({"managed_identity": True, "client_id": "11111111-2222-3333-4444-555555555555"}) \
        .get_token(SCOPE)
    assert token.token == TOKEN and 3500 < token.expires_on - time.time() <= 3600
    [(path, query, headers)] = endpoint.requests
    assert query["resource"] == ["https://storage.azure.com"]
    assert query["client_id"] == ["11111111-2222-3333-4444-555555555555"]  # the user-assigned identity
    if flavor is app_service:
        assert headers["X-IDENTITY-HEADER"] == HEADER_SECRET
    else:
        assert path == "/metadata/identity/oauth2/token" and headers["Metadata"] == "true"


def test_managed_identity_ignores_a_service_principal_in_the_environment(env, endpoints):
    """managed_identity: true means the node's identity: a service principal
    in AZURE_CLIENT_* (which the default chain tries first) is not asked."""
    node, authority = endpoints(), endpoints()
    app_service(env, node)
    env.setenv("AZURE_TENANT_ID", "72f988bf-86f1-41af-91ab-2d7cd011db47")
    env.setenv("AZURE_CLIENT_ID", "00000000-0000-0000-0000-0000000000aa")
    env.setenv("AZURE_CLIENT_SECRET", "sp-SECRET")
    env.setenv("AZURE_AUTHORITY_HOST", authority.url)  # where the principal's sign-in would go
    assert credential({"managed_identity": True}).get_token(SCOPE).token == TOKEN
    assert len(node.requests) == 1 and authority.requests == []


def test_no_credential_named_uses_the_default_chain(env, endpoints):
    endpoint = endpoints()
    app_service(env, endpoint)
    assert credential({}).get_token(SCOPE).token == TOKEN  # the chain reaches the managed identity
    assert len(endpoint.requests) == 1


def test_the_sdk_takes_it_as_a_credential(env, endpoints):
    from azure.core.pipeline import PipelineRequest, PipelineContext
    from azure.core.pipeline.policies import BearerTokenCredentialPolicy
    from azure.core.rest import HttpRequest
    app_service(env, endpoints())
    request = PipelineRequest(HttpRequest("GET", "https://acct.blob.core.windows.net/c"), PipelineContext(None))
    BearerTokenCredentialPolicy(credential(), SCOPE).on_request(request)
    assert request.http_request.headers["Authorization"] == f"Bearer {TOKEN}"


# -- no identity: a configuration problem, not retried ------------------------------
def test_no_managed_identity_on_the_node_is_a_config_error(env):
    """IMDS does not answer (not an Azure VM): exit 2 at once, saying what to do."""
    env.setenv("MOUNTD_STORAGE_BACKOFF", "2")  # a retry would take a second at least
    started = time.monotonic()
    with pytest.raises(ConfigError) as e:
        credential(name="training").get_token(SCOPE)
    assert time.monotonic() - started < 1
    assert not isinstance(e.value, StorageError) and e.value.exit_code == 2
    check_message(e.value, "datastore 'training'", "no managed identity is available on this node",
                  "account_key_env")


def test_an_identity_the_node_does_not_have_is_a_config_error(env, endpoints):
    endpoint = endpoints(then="refuse")
    imds(env, endpoint)
    with pytest.raises(ConfigError) as e:
        credential({"managed_identity": True, "client_id": "cid-404"}).get_token(SCOPE)
    assert len(endpoint.requests) == 1
    check_message(e.value, "datastore 'ds'", "refused a token", "HTTP 400", "client id cid-404")


def test_default_chain_with_nothing_to_use_is_a_config_error(env):
    with pytest.raises(ConfigError) as e:
        credential({}, name="training").get_token(SCOPE)
    check_message(e.value, "datastore 'training'", "no credential found by the default chain", "sign in")


# -- a failing endpoint: retried, then a storage error --------------------------------
@pytest.mark.parametrize("flavor", [app_service, imds])
@pytest.mark.parametrize("status", [500, 503, 429, 410, 404])
def test_transient_failures_are_retried(env, endpoints, flavor, status):
    endpoint = endpoints([status, status])
    flavor(env, endpoint)
    assert credential().get_token(SCOPE).token == TOKEN
    assert len(endpoint.requests) == 3


def test_retry_after_is_honoured(env, endpoints):
    endpoint = endpoints([429], retry_after="1")
    app_service(env, endpoint)
    started = time.monotonic()
    assert credential().get_token(SCOPE).token == TOKEN
    assert time.monotonic() - started >= 1 and len(endpoint.requests) == 2


@pytest.mark.parametrize("flavor", [app_service, imds])
def test_a_stalled_answer_is_abandoned_and_asked_again(env, endpoints, flavor):
    endpoint = endpoints(["stall"])
    flavor(env, endpoint)
    started = time.monotonic()
    assert credential().get_token(SCOPE).token == TOKEN
    assert len(endpoint.requests) == 2 and time.monotonic() - started < 5


def test_an_endpoint_that_keeps_failing_is_a_storage_error(env, endpoints):
    endpoint = endpoints(then=503)
    app_service(env, endpoint)
    with pytest.raises(TokenUnavailable) as e:
        credential(name="training").get_token(SCOPE)
    assert len(endpoint.requests) == 4  # the first try and MOUNTD_STORAGE_RETRIES=3
    assert isinstance(e.value, StorageError) and not isinstance(e.value, ConfigError)
    assert e.value.exit_code == 3
    check_message(e.value, "datastore 'training'", "after 4 tries", "HTTP 503")


def test_a_platform_endpoint_that_is_not_there_is_retried(env):
    """IDENTITY_ENDPOINT names an endpoint that takes no connections: the
    platform says there is one, so it is an outage, not a configuration."""
    env.setenv("IDENTITY_ENDPOINT", f"http://127.0.0.1:{free_port()}/msi/token")
    env.setenv("IDENTITY_HEADER", HEADER_SECRET)
    with pytest.raises(TokenUnavailable) as e:
        credential().get_token(SCOPE)
    check_message(e.value, "after 4 tries")


def test_an_endpoint_gone_after_a_token_is_an_outage(env, endpoints):
    """IMDS gave a token, then stops answering: the same error that means
    "no identity here" before is now retried and a storage error."""
    endpoint = endpoints()
    imds(env, endpoint)
    cred = credential()
    assert cred.get_token(SCOPE).token == TOKEN
    endpoint.stop()
    with pytest.raises(TokenUnavailable):
        cred.get_token("https://other.example/.default")  # not in the token cache: asked


def test_a_mount_answers_eio(env, endpoints):
    """A read whose token cannot be had fails with EIO, not EINVAL."""
    app_service(env, endpoints(then=500))
    with pytest.raises(FsError) as e, errno_for("read x"):
        credential().get_token(SCOPE)
    assert e.value.errno == errno.EIO


# -- tokens only over https -----------------------------------------------------------
def test_require_https():
    require_https("https://acct.blob.core.windows.net", "datastore 'ds'")
    with pytest.raises(ConfigError) as e:
        require_https("http://127.0.0.1:10000/devstoreaccount1", "datastore 'ds'")
    check_message(e.value, "datastore 'ds'", "only over https", "http://127.0.0.1:10000/devstoreaccount1")


@pytest.mark.parametrize("spec", [{}, {"managed_identity": True}])
def test_a_token_datastore_on_an_http_endpoint_is_refused_before_any_request(env, spec):
    cfg = parse("emu", {"type": "azure_blob", "container_name": "data", "credential": spec,
                        "endpoint": f"http://127.0.0.1:{free_port()}/devstoreaccount1"}, "t")
    with pytest.raises(ConfigError) as e:
        open_store(cfg)
    check_message(e.value, "datastore 'emu'", "only over https")
