"""Credential references of a datastore and their resolution.

A datastore names where its secret lives (an environment variable, a file) or
how to get a token; the secret itself is read only when a store is opened,
and lives only in memory. Inline secrets written by the user into a workspace
file are honoured, never produced by mountd.

Two kinds get Microsoft Entra tokens (`mountd.storage.identity` makes them):

    managed_identity   `managed_identity: true`: the node's managed identity
                       and nothing else (a user-assigned one with client_id)
    default            no credential named: the default chain (a service
                       principal from AZURE_CLIENT_*, workload identity,
                       managed identity, a developer's Azure CLI login, ...)
"""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import dataclass

from mountd.errors import ConfigError

# key in the YAML `credential:` mapping -> (kind, source)
REFERENCE_KEYS = {
    "account_key_env": ("account_key", "env"),
    "account_key_file": ("account_key", "file"),
    "sas_token_env": ("sas_token", "env"),
    "sas_token_file": ("sas_token", "file"),
    "connection_string_env": ("connection_string", "env"),
    "connection_string_file": ("connection_string", "file"),
}
INLINE_KEYS = ("account_key", "sas_token", "connection_string")
FLAG_KEYS = ("managed_identity", "anonymous")
OTHER_KEYS = ("client_id",)  # for a user-assigned managed identity
ALL_KEYS = set(REFERENCE_KEYS) | set(INLINE_KEYS) | set(FLAG_KEYS) | set(OTHER_KEYS)
# Kinds that authenticate with a bearer token (sent only over https).
TOKEN_KINDS = ("managed_identity", "default")
# What the default chain reads that is a secret (EnvironmentCredential): a
# service principal's client secret or certificate password, a user's password.
CHAIN_SECRET_VARIABLES = ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_PASSWORD")
# How a message refusing a token ends: what the user can give instead.
ANOTHER_CREDENTIAL = ("give the datastore another credential (account_key_env, sas_token_env, "
                      "connection_string_env, or their *_file forms)")


@dataclass(frozen=True)
class Credential:
    """A resolved credential. `secret` never appears in repr()."""

    kind: str  # account_key | sas_token | connection_string | managed_identity | default | anonymous
    secret: str | None = None
    client_id: str | None = None
    where: str = ""  # whose credential it is, for messages ("datastore 'training'")

    def __repr__(self) -> str:
        return f"Credential(kind={self.kind!r})"


def validate_spec(spec: object, where: str) -> dict:
    """Check the shape of a `credential:` mapping (no secret is read)."""
    if spec is None:
        return {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{where}: credential must be a mapping, got {type(spec).__name__}")
    unknown = set(spec) - ALL_KEYS
    if unknown:
        raise ConfigError(f"{where}: unknown credential key {sorted(unknown)[0]!r} "
                          f"(expected one of {', '.join(sorted(ALL_KEYS - set(OTHER_KEYS)))})")
    chosen = [k for k in spec if k not in OTHER_KEYS and spec[k] not in (None, False)]
    if len(chosen) > 1:
        raise ConfigError(f"{where}: give one credential, not {' and '.join(sorted(chosen))}")
    for key in chosen:
        value = spec[key]
        if key in FLAG_KEYS:
            if value is not True:
                raise ConfigError(f"{where}: credential.{key} must be true")
        elif not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{where}: credential.{key} must be a non-empty string")
    return spec


def describe(spec: dict | None) -> str:
    """A redacted description for `datastore list/show`: where, never what."""
    spec = spec or {}
    for key, (kind, source) in REFERENCE_KEYS.items():
        if spec.get(key):
            return f"{kind} from {'$' if source == 'env' else 'file '}{spec[key]}"
    for key in INLINE_KEYS:
        if spec.get(key):
            return f"{key} (inline in workspace file, redacted)"
    cid = spec.get("client_id")
    if spec.get("managed_identity"):
        return "managed identity of the node" + (f" (client id {cid})" if cid else "")
    if spec.get("anonymous"):
        return "anonymous"
    return ("none: the default chain (AZURE_CLIENT_* service principal, workload identity, managed identity"
            + (f" (client id {cid})" if cid else "") + ", Azure CLI/PowerShell/azd login)")


def secret_variables(spec: dict | None) -> set[str]:
    """The environment variables a spec may read a secret from: those its
    *_env keys name, and, for the default chain (no credential named), the
    secrets azure-identity reads from the environment."""
    spec = spec or {}
    names = {spec[k] for k, (_, source) in REFERENCE_KEYS.items() if source == "env" and isinstance(spec.get(k), str)}
    if not any(spec.get(k) for k in (*REFERENCE_KEYS, *INLINE_KEYS, *FLAG_KEYS)):
        names.update(CHAIN_SECRET_VARIABLES)
    return names


def has_inline_secret(spec: dict | None) -> bool:
    return any((spec or {}).get(k) for k in INLINE_KEYS)


def resolve(spec: dict | None, where: str) -> Credential:
    """Read the secret a spec refers to; ConfigError if it is missing or empty."""
    spec = spec or {}
    for key, (kind, source) in REFERENCE_KEYS.items():
        ref = spec.get(key)
        if not ref:
            continue
        if source == "env":
            value = os.environ.get(ref)
            if value is None:
                raise ConfigError(f"{where}: environment variable {ref} ({kind}) is not set")
        else:
            try:
                # ${CREDENTIALS_DIRECTORY}: where systemd's LoadCredential= puts them
                with open(os.path.expandvars(os.path.expanduser(ref)), encoding="utf-8") as f:
                    value = f.read()
            except OSError as e:
                raise ConfigError(f"{where}: cannot read {kind} file {ref}: {e.strerror}") from None
        value = value.strip()
        origin = f"{'$' if source == 'env' else 'file '}{ref}"
        if not value:
            raise ConfigError(f"{where}: {kind} from {origin} is empty")
        if kind == "account_key":
            check_account_key(value, f"{where}: the account key from {origin}")
        return Credential(kind, value, where=where)
    for key in INLINE_KEYS:
        if spec.get(key):
            value = str(spec[key]).strip()
            if key == "account_key":
                check_account_key(value, f"{where}: the inline account key")
            return Credential(key, value, where=where)
    if spec.get("anonymous"):
        return Credential("anonymous", where=where)
    if spec.get("managed_identity"):
        return Credential("managed_identity", client_id=spec.get("client_id"), where=where)
    return Credential("default", client_id=spec.get("client_id"), where=where)


def require_https(account_url: str, where: str) -> None:
    """ConfigError unless `account_url` is https: a bearer token must not
    travel in the clear (the SDK refuses it too: "Token credential is only
    supported with HTTPS")."""
    from urllib.parse import urlsplit
    scheme = urlsplit(account_url).scheme.lower()
    if scheme != "https":
        raise ConfigError(f"{where}: a token (managed identity or the default credential chain) is sent only "
                          f"over https, and the endpoint {account_url} is {scheme or 'not a URL'}: use an https "
                          f"endpoint, or {ANOTHER_CREDENTIAL}")


def check_account_key(value: str, what: str) -> None:
    """ConfigError unless an account key is base64 (a key cut short by a
    paste, or a SAS or connection string given as a key, is not): else
    every request would fail deep inside the signing code."""
    try:
        base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{what} is not valid base64: check for a truncated paste (an account key is "
                          "88 characters ending in '==')") from None


def check_endpoint_account(url: str, where: str) -> None:
    """ConfigError for an emulator's endpoint (an IP address or localhost)
    without the account in its path: such a service takes the first path
    segment for the account, so every request would go astray and storage
    would answer with a puzzling 400 or 404. (Azure's own hosts carry the
    account in the host name.)"""
    import ipaddress
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    try:
        literal = bool(ipaddress.ip_address(host))
    except ValueError:
        literal = host == "localhost" or host.endswith(".localhost")
    if literal and not parts.path.strip("/"):
        raise ConfigError(f"{where}: the endpoint {url} names no account: an emulator's endpoint must include "
                          f"the account, e.g. {parts.scheme}://{parts.netloc}/devstoreaccount1")


# Azurite's documented development account (UseDevelopmentStorage=true).
_DEVELOPMENT = {"accountname": "devstoreaccount1",
                "accountkey": "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==",  # noqa: E501
                "blobendpoint": "http://127.0.0.1:10000/devstoreaccount1",
                "fileendpoint": "http://127.0.0.1:10004/devstoreaccount1"}


def connection_string_parts(secret: str, service: str, where: str) -> tuple[str, str | None, str | None, str | None]:
    """(account URL of `service` ("blob" or "file"), account name, account
    key, SAS token) from an Azure Storage connection string."""
    fields = {}
    for part in secret.split(";"):
        field, sep, value = part.strip().partition("=")
        if sep:
            fields[field.strip().lower()] = value.strip()
    if fields.get("usedevelopmentstorage", "").lower() == "true":
        fields = {**_DEVELOPMENT, **{k: v for k, v in fields.items() if k != "usedevelopmentstorage"}}
    name, key, sas = fields.get("accountname"), fields.get("accountkey"), fields.get("sharedaccesssignature")
    if key:
        check_account_key(key, f"{where}: the connection string's AccountKey")
    url = fields.get(f"{service}endpoint")
    if not url:
        if not name:
            raise ConfigError(f"{where}: the connection string names no AccountName or {service.capitalize()}Endpoint")
        protocol = fields.get("defaultendpointsprotocol", "https")
        url = f"{protocol}://{name}.{service}.{fields.get('endpointsuffix', 'core.windows.net')}"
    check_endpoint_account(url, f"{where}: the connection string's {service.capitalize()}Endpoint")
    if not name:  # an endpoint alone: the account is its host's first label, or the path's for emulators
        from urllib.parse import urlsplit
        parts = urlsplit(url)
        name = parts.path.strip("/").split("/")[0] or (parts.hostname or "").split(".")[0] or None
    return url.rstrip("/"), name, key, sas.lstrip("?") if sas else None
