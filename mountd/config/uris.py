"""Data reference URIs: which datastore and which path inside it a URI names.

    azureml://datastores/<name>/paths/<path>             a registered or inline datastore
    wasbs://<container>@<account>.blob.<suffix>/<path>   (also wasb://)
    https://<account>.blob.<suffix>/<container>/<path>
    https://<account>.dfs.<suffix>/<container>/<path>    (ADLS Gen2: the same data as blob)
    https://<account>.file.<suffix>/<share>/<path>

where <suffix> is one of Azure's storage endpoint suffixes (public cloud,
China, US Government). An account URI resolves to the datastore registered
for the same account and container (or share), so that datastore's
credential applies; failing that it implies a datastore
`uri_<account>_<container>` that authenticates with the node's managed
identity. Any other host is accepted only as a registered datastore's
endpoint (an emulator, a private endpoint), and resolves to that datastore:
a token must never go to a host because it merely looks like Azure's
(`acct.blob.core.windows.net.example.org`).

A URI never carries a credential: a query string (a SAS token) or user info is
refused, because manifests are copied, logged and committed.
"""

from __future__ import annotations

import re
from typing import Mapping
from urllib.parse import SplitResult, unquote, urlsplit

from mountd.config import datastores
from mountd.config.datastores import DEFAULT_SUFFIX, DatastoreConfig
from mountd.config.names import MAX_NAME_LENGTH, check_name
from mountd.errors import UsageError, shorten
from mountd.paths import normalize_path

SCHEMES = ("azureml", "wasbs", "wasb", "https", "http")
FORMS = ("azureml://datastores/NAME/paths/PATH, wasbs://CONTAINER@ACCOUNT.blob.core.windows.net/PATH "
         "or https://ACCOUNT.blob|dfs|file.core.windows.net/CONTAINER/PATH")
# The long form Azure ML prints names the workspace too; there is only one
# workspace here, so that part is accepted and not used.
_AZUREML = re.compile(
    r"azureml://(?:subscriptions/[^/]+/resourcegroups/[^/]+/"
    r"(?:providers/microsoft\.machinelearningservices/)?workspaces/[^/]+/)?"
    r"datastores/(?P<name>[^/]+)/paths(?:/(?P<path>.*))?", re.IGNORECASE | re.DOTALL)
# Azure Storage's endpoint suffixes: public cloud, China (21Vianet), US
# Government (Get-AzEnvironment's StorageEndpointSuffix). Any other cloud, or
# a private endpoint, is reached through a registered datastore's endpoint.
CLOUD_SUFFIXES = ("core.windows.net", "core.chinacloudapi.cn", "core.usgovcloudapi.net")
# Storage account names: 3-24 lowercase letters and digits.
_HOST = re.compile(r"(?P<account>[a-z0-9]{3,24})\.(?P<service>blob|dfs|file)\.(?P<suffix>"
                   + "|".join(re.escape(s) for s in CLOUD_SUFFIXES) + ")")
# dfs (ADLS Gen2) serves the same containers as the blob endpoint
_SERVICE_TYPE = {"blob": "azure_blob", "dfs": "azure_blob", "file": "azure_file"}
_REGISTER = ("register a datastore for it (mountd datastore register-blob ... --endpoint URL) and write "
             "azureml://datastores/NAME/paths/PATH")
_AZURE_TYPES = ("azure_blob", "azure_file")
_SAS_MESSAGE = ("a URI must not carry a query string: a SAS token does not belong in a manifest. Register a "
                "datastore whose credential references the token (sas_token_env or sas_token_file) "
                "and use azureml://datastores/NAME/paths/PATH")

Stores = Mapping[str, DatastoreConfig]  # lower-case name -> datastore, like Workspace.datastores


def parse_uri(uri: object, stores) -> tuple[DatastoreConfig, str]:
    """The datastore and normalized path `uri` names.

    `stores` maps lower-case names to datastores (inline ones first, so they
    win a tie), or is a Workspace. Raises UsageError for a bad URI."""
    stores = getattr(stores, "datastores", stores)
    if not isinstance(uri, str) or not uri.strip():
        raise UsageError(f"a URI must be a non-empty string, got {_short(uri)}")
    if "?" in uri:
        raise UsageError(_SAS_MESSAGE)
    if "#" in uri:
        raise UsageError("a URI must not have a fragment ('#'); write '#' in a path as %23")
    scheme, sep, _ = uri.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise UsageError(f"unsupported URI {_short(uri)}: expected {FORMS}")
    if scheme == "azureml":
        return _azureml(uri, stores)
    parts = _split(uri)
    if scheme in ("wasb", "wasbs"):
        return _wasb(parts, stores)
    return _https(parts, stores)


def implied_name(account: str, container: str) -> str:
    """The name of the datastore an account URI implies, within the name rule."""
    return re.sub(r"[^A-Za-z0-9_]", "_", f"uri_{account}_{container}")[:MAX_NAME_LENGTH]


# -- the forms ------------------------------------------------------------------
def _azureml(uri: str, stores: Stores) -> tuple[DatastoreConfig, str]:
    m = _AZUREML.fullmatch(uri)
    if not m:
        raise UsageError(f"malformed URI {_short(uri)}: expected azureml://datastores/NAME/paths/PATH")
    name = check_name(unquote(m["name"]), "datastore name in the URI")
    cfg = stores.get(name.lower())
    if cfg is None:
        raise UsageError(f"unknown datastore {name!r} in the URI (known: {known_names(stores)})")
    return cfg, _path(_segments(m["path"] or ""))


def _wasb(parts: SplitResult, stores: Stores) -> tuple[DatastoreConfig, str]:
    container, at, host = parts.netloc.rpartition("@")
    host = host.lower()
    # Never echo the part before '@': it could be user:password.
    if not at or not container or ":" in container:
        raise UsageError("a wasbs:// URI must read wasbs://CONTAINER@ACCOUNT.blob.SUFFIX/PATH")
    segments = [unquote(container)] + _segments(parts.path)
    m = _HOST.fullmatch(host)
    if m and m["service"] == "blob":
        return _account_uri(stores, "azure_blob", m["account"], m["suffix"], host, segments)
    found = None if m else _registered(stores, host, segments, "azure_blob")
    if found is None:
        raise UsageError(f"the host {_short(host)} of a wasbs:// URI must be ACCOUNT.blob.SUFFIX "
                         f"(SUFFIX: {', '.join(CLOUD_SUFFIXES)}) or a registered datastore's endpoint: "
                         f"{_REGISTER}")
    return found


def _https(parts: SplitResult, stores: Stores) -> tuple[DatastoreConfig, str]:
    if "@" in parts.netloc:
        raise UsageError("a URI must not carry user info (credentials before '@'); reference them "
                         "from a registered datastore's credential")
    if not parts.netloc:
        raise UsageError(f"the URI {_short(parts.geturl())} names no host")
    netloc = parts.netloc.lower()
    m = _HOST.fullmatch(netloc)  # a port, or any other host, means a custom endpoint
    segments = _segments(parts.path)
    if m:
        kind = _SERVICE_TYPE[m["service"]]
        if m["service"] == "dfs":  # registered datastores name the blob endpoint of the account
            netloc = f"{m['account']}.blob.{m['suffix']}"
        return _account_uri(stores, kind, m["account"], m["suffix"], netloc, segments)
    found = _registered(stores, netloc, segments)
    if found is None:
        raise UsageError(f"no registered datastore serves {parts.scheme}://{_short(netloc, bare=True)}/"
                         f"{_short('/'.join(segments[:1]), bare=True)}, and it is not an Azure Storage "
                         f"host (ACCOUNT.blob|dfs|file.SUFFIX, SUFFIX: {', '.join(CLOUD_SUFFIXES)}): "
                         f"{_REGISTER}")
    return found


def _account_uri(stores: Stores, kind: str, account: str, suffix: str, netloc: str,
                 segments: list[str]) -> tuple[DatastoreConfig, str]:
    what = "container" if kind == "azure_blob" else "share"
    if not segments:
        raise UsageError(f"the URI names no {what} after the account {account!r}")
    found = _registered(stores, netloc, segments, kind) or _same_account(stores, kind, account, suffix, segments)
    if found is not None:
        return found
    raw = {"type": kind, "account_name": account, f"{what}_name": segments[0],
           "endpoint_suffix": suffix, "credential": {"managed_identity": True}}
    return datastores.parse(implied_name(account, segments[0]), raw, "URI"), _path(segments[1:])


# -- matching registered datastores ---------------------------------------------
def _registered(stores: Stores, netloc: str, segments: list[str],
                kind: str | None = None) -> tuple[DatastoreConfig, str] | None:
    """The datastore whose account URL (endpoint) the URI lies under."""
    for cfg in stores.values():
        if cfg.type not in _AZURE_TYPES or (kind and cfg.type != kind):
            continue
        if not cfg.endpoint and not cfg.account_name:
            continue  # a connection-string datastore: its account is not known before reading it
        base = urlsplit(cfg.account_url())
        prefix = _segments(base.path)
        n = len(prefix)
        if base.netloc.lower() == netloc and segments[:n] == prefix and segments[n:n + 1] == [_target(cfg)]:
            return cfg, _path(segments[n + 1:])
    return None


def _same_account(stores: Stores, kind: str, account: str, suffix: str,
                  segments: list[str]) -> tuple[DatastoreConfig, str] | None:
    """The datastore with the same account, container and cloud (even if it
    reaches them through a custom endpoint)."""
    for cfg in stores.values():
        if cfg.type == kind and (cfg.account_name or "").lower() == account \
                and (cfg.endpoint_suffix or DEFAULT_SUFFIX).lower() == suffix and _target(cfg) == segments[0]:
            return cfg, _path(segments[1:])
    return None


def _target(cfg: DatastoreConfig) -> str | None:
    return cfg.container_name if cfg.type == "azure_blob" else cfg.share_name


# -- small helpers --------------------------------------------------------------
def _split(uri: str) -> SplitResult:
    try:
        parts = urlsplit(uri)
        parts.port  # noqa: B018 -- raises ValueError for a bad port
        return parts
    except ValueError as e:
        raise UsageError(f"malformed URI {_short(uri)}: {e}") from None


def _segments(path: str) -> list[str]:
    """Percent-decoded path segments, empty ones dropped."""
    return [unquote(s) for s in path.split("/") if s]


def _path(segments: list[str]) -> str:
    return normalize_path("/".join(segments))


def known_names(stores: Stores, limit: int = 20) -> str:
    names = sorted(c.name for c in stores.values())
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def _short(value: object, limit: int = 80, bare: bool = False) -> str:
    return shorten(value, limit, bare)  # a URI is longer than most values: 80 characters, not 60
