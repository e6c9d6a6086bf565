"""Datastore definitions: their YAML schema, validation and defaults.

The same schema serves the workspace file and a manifest's inline
`datastores:` section:

    training:
      type: azure_blob            # azure_blob | azure_file | local
      account_name: myacct
      container_name: data        # azure_blob
      share_name: files           # azure_file
      endpoint: http://127.0.0.1:10000/devstoreaccount1   # optional account URL
      endpoint_suffix: core.chinacloudapi.cn              # optional sovereign cloud
      credential: {account_key_env: MY_KEY}
    scratch:
      type: local
      root: /data/scratch
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

from mountd.config import credentials
from mountd.config.names import check_name
from mountd.errors import ConfigError, shorten

TYPES = ("azure_blob", "azure_file", "local")
# The names the seed's `datastore_type` reports, per type.
TYPE_LABELS = {"azure_blob": "AzureBlob", "azure_file": "AzureFile", "local": "Local"}
DEFAULT_SUFFIX = "core.windows.net"

_FIELDS = {
    "azure_blob": {"type", "account_name", "container_name", "endpoint", "endpoint_suffix", "credential"},
    "azure_file": {"type", "account_name", "share_name", "endpoint", "endpoint_suffix", "credential"},
    "local": {"type", "root"},
}
# Azure's rule for container and share names: 3-63 of a-z, 0-9, '-', no '--',
# starting and ending with a letter or digit.
_CONTAINER = re.compile(r"(?!.*--)[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_REQUIRED = {"azure_blob": ("container_name",), "azure_file": ("share_name",), "local": ("root",)}


@dataclass(frozen=True)
class DatastoreConfig:
    name: str
    type: str
    account_name: str | None = None
    container_name: str | None = None
    share_name: str | None = None
    endpoint: str | None = None
    endpoint_suffix: str | None = None
    root: str | None = None
    credential: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def label(self) -> str:
        return TYPE_LABELS[self.type]

    @property
    def location(self) -> str:
        """Where the data lives, for messages (never holds a secret)."""
        if self.type == "local":
            return self.root or ""
        target = self.container_name if self.type == "azure_blob" else self.share_name
        return f"{self.account_url()}/{target}"

    def account_url(self) -> str:
        if self.endpoint:
            return self.endpoint.rstrip("/")
        service = "blob" if self.type == "azure_blob" else "file"
        return f"https://{self.account_name}.{service}.{self.endpoint_suffix or DEFAULT_SUFFIX}"

    def to_dict(self) -> dict:
        """The YAML form, as written back into a workspace file."""
        out: dict[str, Any] = {"type": self.type}
        for key in sorted(_FIELDS[self.type] - {"type", "credential"}):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.credential:
            out["credential"] = dict(self.credential)
        return out

    def describe(self) -> dict:
        """What `datastore show` prints: everything but secrets."""
        out = {"name": self.name, **self.to_dict()}
        if self.type != "local":
            out["account_url"] = self.account_url()
            out["credential"] = credentials.describe(self.credential)
        return out


def parse(name: object, raw: object, where: str) -> DatastoreConfig:
    """Validate one datastore mapping and return its config."""
    name = check_name(name)
    where = f"{where}: datastore {name!r}"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    kind = raw.get("type")
    if kind not in TYPES:
        raise ConfigError(f"{where}: type must be one of {', '.join(TYPES)}, got {shorten(kind)}")
    unknown = set(raw) - _FIELDS[kind]
    if unknown:
        raise ConfigError(f"{where}: unknown field {shorten(sorted(unknown)[0])} for type {kind}")
    for key in _FIELDS[kind] - {"type", "credential"}:
        value = raw.get(key)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ConfigError(f"{where}: {key} must be a non-empty string")
    for key in _REQUIRED[kind]:
        if not raw.get(key):
            raise ConfigError(f"{where}: {key} is required for type {kind}")
    if kind == "local":
        if not os.path.isabs(os.path.expanduser(raw["root"])):
            raise ConfigError(f"{where}: root must be an absolute path, got {shorten(raw['root'])}")
        return DatastoreConfig(name=name, type=kind, root=os.path.expanduser(raw["root"]))

    target_key = "container_name" if kind == "azure_blob" else "share_name"
    if not _CONTAINER.fullmatch(raw[target_key]) and (kind, raw[target_key]) != ("azure_blob", "$root"):
        raise ConfigError(f"{where}: invalid {target_key} {shorten(raw[target_key])}: 3-63 lowercase "
                          "letters, digits and single hyphens, starting and ending with a letter or digit")
    spec = credentials.validate_spec(raw.get("credential"), where)
    if kind == "azure_file" and spec.get("anonymous"):
        raise ConfigError(f"{where}: Azure Files has no anonymous access; give an account key, "
                          "SAS token or connection string")
    if not raw.get("account_name") and not raw.get("endpoint") and not spec.get("connection_string_env") \
            and not spec.get("connection_string_file") and not spec.get("connection_string"):
        raise ConfigError(f"{where}: account_name is required (or an endpoint or connection string)")
    if raw.get("endpoint"):
        url = urlparse(raw["endpoint"])
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"{where}: endpoint must be an http(s) URL, got {shorten(raw['endpoint'])}")
        if url.query:
            raise ConfigError(f"{where}: endpoint must not carry a query string; "
                              "put a SAS token in the credential")
        credentials.check_endpoint_account(raw["endpoint"], where)
    return DatastoreConfig(
        name=name, type=kind, account_name=raw.get("account_name"),
        container_name=raw.get("container_name"), share_name=raw.get("share_name"),
        endpoint=raw.get("endpoint"), endpoint_suffix=raw.get("endpoint_suffix"), credential=spec,
    )
