"""Microsoft Entra tokens for datastores: which azure-identity credential a
token kind uses, and how its failures surface.

    managed_identity   ManagedIdentityCredential only (`client_id` for a
                       user-assigned identity): IMDS on a VM, the endpoint in
                       IDENTITY_ENDPOINT/MSI_ENDPOINT where a platform sets
                       one, workload identity on Kubernetes. Never a service
                       principal from the environment or someone's CLI login.
    default            (no credential named) DefaultAzureCredential without
                       interactive sign-in: AZURE_CLIENT_* service principal,
                       workload identity, managed identity, then a developer's
                       Azure CLI / PowerShell / azd login.

`token_credential` wraps either so that a token request

- is retried with the storage retry budget and timeouts
  (`mountd.storage.retry`, MOUNTD_STORAGE_*), not azure-identity's own (which
  differ per endpoint and can run to minutes), and honours Retry-After;
- fails as a mountd error, never as an azure-identity exception (a mount
  would turn that into EINVAL, a command into "internal error"):
  ConfigError when there is no identity to ask, or its endpoint refuses
  (4xx) -- a configuration problem, not retried; TokenUnavailable (a
  StorageError: EIO in a mount, exit 3 for a transfer) once the endpoint has
  kept failing (5xx, 404/410/429, no answer, a stalled answer).

"No identity here" is azure-identity's CredentialUnavailableError, or a
chain whose every member was unavailable, before any token was had; once a
token has come from the credential, the same error means its endpoint went
away for a while, and it is retried. A token endpoint's 5xx can arrive as a
CredentialUnavailableError too (MSAL reads any non-token answer so), so the
HTTP status of the endpoint's last answer is watched and decides first.

azure-identity is imported only when a credential is made: the lean data
path imports this module without needing it.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from mountd.config.credentials import ANOTHER_CREDENTIAL as _ANOTHER
from mountd.errors import ConfigError, TokenUnavailable, first_line
from mountd.storage.retry import TRANSIENT_STATUS as STORAGE_TRANSIENT
from mountd.storage.retry import StoragePolicy, policy, retry_after

log = logging.getLogger(__name__)

# Answers of a token endpoint worth asking again: storage's, and what IMDS
# documents as transient besides (404: being updated, 410: restarting).
TRANSIENT_STATUS = STORAGE_TRANSIENT | {404, 410}


def token_credential(credential, where: str | None = None) -> "RetryingTokenCredential":
    """The token credential for a resolved Credential of kind
    managed_identity or default, wrapped (see the module's doc). `where`
    names the datastore in messages (default: the credential's own)."""
    where = where or getattr(credential, "where", "") or "the datastore"
    if credential.kind not in ("managed_identity", "default"):
        raise ValueError(f"{credential.kind} is not a token credential")
    return RetryingTokenCredential(credential.kind, credential.client_id, where)


@dataclass
class _Failure:
    """One credential's failed attempt: what it raised and the last HTTP
    answer its endpoint gave meanwhile (None: no answer at all)."""
    credential: str
    error: BaseException
    status: int | None
    retry_after: float | None


class _Seen(threading.local):
    """The token endpoints' answers and the failures of the current
    attempt, per thread (several threads may ask at once)."""

    def __init__(self):
        self.status: int | None = None
        self.retry_after: float | None = None
        self.failures: list[_Failure] = []


class _Recorded:
    """A credential (alone, or a member of the default chain) whose failures
    are written down with the HTTP status its endpoint answered, so the
    wrapper can tell "no identity here" from "the endpoint is failing". It
    re-raises: a chain moves on exactly as it would have."""

    def __init__(self, inner, seen: _Seen):
        self.inner = inner
        self.seen = seen

    def get_token(self, *scopes, **kwargs):
        self.seen.status = self.seen.retry_after = None
        try:
            if hasattr(self.inner, "get_token"):
                return self.inner.get_token(*scopes, **kwargs)
            from azure.core.credentials import AccessToken
            options = {k: v for k, v in kwargs.items() if k in ("claims", "tenant_id", "enable_cae") and v}
            info = self.inner.get_token_info(*scopes, options=options)
            return AccessToken(info.token, info.expires_on)
        except BaseException as e:
            self.seen.failures.append(_Failure(type(self.inner).__name__, e, self.seen.status,
                                               self.seen.retry_after))
            raise

    def __enter__(self):
        self.inner.__enter__()
        return self

    def __exit__(self, *args):
        self.inner.__exit__(*args)

    def close(self) -> None:
        self.__exit__(None, None, None)


class RetryingTokenCredential:
    """A TokenCredential (`get_token(*scopes, **kwargs) -> AccessToken`, so
    the Azure SDK clients take it as well) around azure-identity's
    credential for a token kind; see the module's doc for what it adds."""

    def __init__(self, kind: str, client_id: str | None, where: str, retry: StoragePolicy | None = None):
        self.kind, self.client_id, self.where = kind, client_id, where
        self.retry = retry or policy()
        self.source = "the managed identity endpoint" if kind == "managed_identity" else "the default credential chain"
        self._seen = _Seen()
        self._had_token = False
        self._build()

    def _build(self) -> None:
        """(Re)make azure-identity's credential. A fresh one after each
        transient failure: MSAL keeps a failed answer (5xx, 429) of a managed
        identity endpoint for 5 seconds and hands it back instead of asking
        again, so a retry sooner than that would never reach the endpoint."""
        from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

        seen = self._seen

        def hook(pipeline_response) -> None:  # each answer of a token endpoint, before it is read
            response = pipeline_response.http_response
            seen.status = response.status_code
            seen.retry_after = retry_after(response.headers) if response.headers is not None else None

        # One budget: azure-identity does not retry, get_token does; the
        # storage timeouts bound each request.
        pipeline: dict[str, Any] = dict(retry_total=0, connection_timeout=self.retry.connect_timeout,
                                        read_timeout=self.retry.read_timeout, raw_response_hook=hook)
        credential: ManagedIdentityCredential | DefaultAzureCredential
        inner: _Recorded | DefaultAzureCredential
        try:
            if self.kind == "managed_identity":
                credential = ManagedIdentityCredential(client_id=self.client_id, **pipeline)
                inner = _Recorded(credential, seen)
            else:
                credential = DefaultAzureCredential(managed_identity_client_id=self.client_id,
                                                    exclude_interactive_browser_credential=True, **pipeline)
                credential.credentials = tuple(_Recorded(c, seen) for c in credential.credentials)
                inner = credential
        except ValueError as e:  # e.g. workload identity set up without a client id
            raise ConfigError(f"{self.where}: cannot use the managed identity: {first_line(e)}") from None
        self._credential, self._inner = credential, inner

    def get_token(self, *scopes: str, **kwargs):
        attempt = 0
        while True:
            self._seen.failures = []
            try:
                token = self._inner.get_token(*scopes, **kwargs)
            except Exception as e:  # noqa: BLE001 -- every failure becomes a mountd error
                verdict, failure = self._judge(e)
                if verdict != "transient":
                    raise ConfigError(self._config_message(verdict, failure)) from None
                attempt += 1
                if self.retry.spent(attempt):
                    raise TokenUnavailable(f"{self.where}: no token from {self.source} after {attempt} tries: "
                                           f"{_describe(failure)}") from None
                wait = self.retry.wait(attempt, failure.retry_after)
                log.warning("%s: token request failed (%s); retry %d of %d in %.1fs", self.where,
                            _describe(failure), attempt, self.retry.retries, wait)
                time.sleep(wait)
                self._build()
                continue
            self._had_token = True
            return token

    def _judge(self, error: Exception) -> tuple[str, _Failure]:
        """("transient" | "refused" | "absent", the failure that decided)."""
        failures = self._seen.failures or [_Failure(type(error).__name__, error, None, None)]
        verdicts = [(_verdict(f), f) for f in failures]
        for wanted in ("transient", "refused", "absent"):
            for verdict, failure in verdicts:
                if verdict == wanted:
                    if verdict == "absent" and self._had_token:
                        return "transient", failure  # it was there: it went away for a while
                    return verdict, failure
        raise AssertionError("unreachable")

    def _config_message(self, verdict: str, failure: _Failure) -> str:
        if verdict == "refused":
            who = "the managed identity endpoint" if self.kind == "managed_identity" else failure.credential
            check = (f"check that the node has the identity (client id {self.client_id})" if self.client_id
                     else "check that the node has a managed identity") if self.kind == "managed_identity" \
                else "check the identity the chain found"
            return f"{self.where}: {who} refused a token ({_describe(failure)}): {check}, or {_ANOTHER}"
        if self.kind == "managed_identity":
            return (f"{self.where}: no managed identity is available on this node ({_describe(failure)}): "
                    f"assign one to it (client_id for a user-assigned one), or {_ANOTHER}")
        return (f"{self.where}: no credential found by the default chain (AZURE_CLIENT_* service principal, "
                f"workload identity, managed identity, Azure CLI/PowerShell/azd login): sign in, set "
                f"managed_identity: true on a node that has one, or {_ANOTHER}")

    def close(self) -> None:
        self._credential.close()

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self.close()

    def __repr__(self) -> str:
        return f"RetryingTokenCredential({self.kind!r}, {self.where!r})"


def _verdict(failure: _Failure) -> str:
    from azure.core.exceptions import (ClientAuthenticationError, ServiceRequestError,
                                       ServiceResponseError)
    from azure.identity import CredentialUnavailableError

    if failure.status is not None:  # the endpoint answered
        if failure.status in TRANSIENT_STATUS:
            return "transient"
        if 400 <= failure.status < 500:
            return "refused"
        return "transient"  # an answer that was no token (a 2xx without one, a redirect)
    error = failure.error
    causes = _causes(error)
    if any(isinstance(e, ServiceResponseError) for e in causes):
        return "transient"  # connected, then the answer stalled or broke off
    if isinstance(error, CredentialUnavailableError):
        return "absent"  # e.g. nothing at IMDS's address: not an Azure VM
    if any(isinstance(e, (ServiceRequestError, OSError)) for e in causes):
        return "transient"  # an endpoint the platform named does not take connections
    if isinstance(error, ClientAuthenticationError):
        return "refused"  # e.g. a CLI login that has expired
    return "transient"


def _causes(error: BaseException | None) -> list[BaseException]:
    """The error and those it was raised from or during, innermost last."""
    seen: list[BaseException] = []
    while error is not None and error not in seen and len(seen) < 10:
        seen.append(error)
        error = error.__cause__ or error.__context__
    return seen


def _describe(failure: _Failure) -> str:
    status = f"HTTP {failure.status}: " if failure.status is not None else ""
    return f"{failure.credential}: {status}{first_line(failure.error)}"
