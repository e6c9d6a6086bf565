"""The workspace registry: named datastores and a default, in one YAML file.

Located by `--workspace`, else `$MOUNTD_WORKSPACE`, else
`~/.config/mountd/workspace.yaml`. With no file at all, the embedded local
datastore `workspacelocalstore` (under the user's data directory) serves, so
mountd works with no cloud account. Names are case-insensitive.

    default_datastore: training
    datastores:
      training: {type: azure_blob, account_name: acct, container_name: data,
                 credential: {account_key_env: TRAINING_KEY}}
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from typing import Any

import yaml

from mountd.config import credentials, datastores
from mountd.config.datastores import DatastoreConfig
from mountd.config.names import check_name
from mountd.config.yamlio import load_yaml
from mountd.errors import ConfigError, UsageError
from mountd.fileio import write_atomic

log = logging.getLogger(__name__)

LOCAL_STORE_NAME = "workspacelocalstore"
_TOP_KEYS = {"default_datastore", "datastores", "allowed_roots", "cache"}


def default_path() -> str:
    env = os.environ.get("MOUNTD_WORKSPACE")
    if env:
        return env
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser("~/.config")
    return os.path.join(base, "mountd", "workspace.yaml")


def data_dir() -> str:
    """Where mountd keeps per-user data (the embedded local datastore)."""
    base = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(base, "mountd")


def embedded_local_store() -> DatastoreConfig:
    return DatastoreConfig(name=LOCAL_STORE_NAME, type="local",
                           root=os.path.join(data_dir(), LOCAL_STORE_NAME))


@dataclass
class Workspace:
    """Datastores by name, one default, and the file they came from."""

    path: str
    datastores: dict[str, DatastoreConfig] = field(default_factory=dict)  # key: lower-case name
    default_name: str | None = None
    allowed_roots: list[str] = field(default_factory=list)
    cache: dict | None = None  # the `cache:` settings section, validated when used
    exists: bool = False

    # -- loading --------------------------------------------------------------
    @classmethod
    def load(cls, path: str | None = None, missing_ok: bool = False,
             named_by: str = "--workspace") -> "Workspace":
        """The workspace in `path`, else $MOUNTD_WORKSPACE's, else the default
        location's. Only the default location may be absent (the embedded
        local datastore then serves): a file named explicitly that does not
        exist is a ConfigError, unless `missing_ok` (a registration creates
        it). `named_by` says who named `path`, for that message."""
        if not path and os.environ.get("MOUNTD_WORKSPACE"):
            named_by = "$MOUNTD_WORKSPACE"
        explicit = bool(path or os.environ.get("MOUNTD_WORKSPACE"))
        path = os.path.abspath(os.path.expanduser(path or default_path()))
        ws = cls(path=path)
        ws._add(embedded_local_store())
        if not os.path.exists(path):
            if explicit and not missing_ok:
                raise ConfigError(f"the workspace file {path} (named by {named_by}) does not exist: check the "
                                  f"path, or register a datastore into it (mountd --workspace {path} datastore "
                                  f"register-...) to create it")
            ws.default_name = LOCAL_STORE_NAME
            return ws
        ws.exists = True
        raw = load_yaml(path, what="workspace file")
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a workspace file must be a mapping")
        unknown = set(raw) - _TOP_KEYS
        if unknown:
            raise ConfigError(f"{path}: unknown key {sorted(unknown)[0]!r} "
                              f"(expected {', '.join(sorted(_TOP_KEYS))})")
        stores = raw.get("datastores") or {}
        if not isinstance(stores, dict):
            raise ConfigError(f"{path}: datastores must be a mapping of name to datastore")
        seen: dict[str, str] = {}  # lower-cased name -> the name as written
        for name, body in stores.items():
            cfg = datastores.parse(name, body, path)
            if cfg.name.lower() in seen:
                raise ConfigError(f"{path}: datastore names {seen[cfg.name.lower()]!r} and {cfg.name!r} "
                                  "differ only in case (names are case-insensitive)")
            seen[cfg.name.lower()] = cfg.name
            ws._add(cfg)
        roots = raw.get("allowed_roots") or []
        if not isinstance(roots, list) or not all(isinstance(r, str) and os.path.isabs(r) for r in roots):
            raise ConfigError(f"{path}: allowed_roots must be a list of absolute paths")
        ws.allowed_roots = roots
        ws.cache = raw.get("cache")
        if ws.cache is not None and not isinstance(ws.cache, dict):
            raise ConfigError(f"{path}: cache must be a mapping of settings")
        default = raw.get("default_datastore")
        if default is not None:
            ws.default_name = ws.get(check_name(default, "default_datastore")).name
        else:
            ws.default_name = LOCAL_STORE_NAME
        ws._warn_if_exposed()
        return ws

    def _warn_if_exposed(self) -> None:
        inline = [c.name for c in self.datastores.values() if credentials.has_inline_secret(c.credential)]
        if inline and os.stat(self.path).st_mode & (stat.S_IRGRP | stat.S_IROTH):
            log.warning("workspace file %s holds an inline secret (datastore %s) and other users can "
                        "read it: chmod 600 it, or reference the secret with *_env/*_file",
                        self.path, inline[0])

    def _add(self, cfg: DatastoreConfig) -> None:
        self.datastores[cfg.name.lower()] = cfg

    # -- queries --------------------------------------------------------------
    def get(self, name: str) -> DatastoreConfig:
        cfg = self.datastores.get(str(name).lower())
        if cfg is None:
            known = ", ".join(sorted(c.name for c in self.datastores.values()))
            raise UsageError(f"unknown datastore {name!r} (known: {known})")
        return cfg

    @property
    def default(self) -> DatastoreConfig:
        return self.get(self.default_name or LOCAL_STORE_NAME)

    # -- changes (each saved at once) ----------------------------------------
    def register(self, cfg: DatastoreConfig, overwrite: bool = False) -> None:
        existing = self.datastores.get(cfg.name.lower())
        if existing is not None and not overwrite and existing.name.lower() != LOCAL_STORE_NAME:
            raise UsageError(f"datastore {existing.name!r} is already registered "
                             "(remove it first, or pass --overwrite)")
        self._add(cfg)
        self.save()

    def set_default(self, name: str) -> None:
        self.default_name = self.get(name).name
        self.save()

    def remove(self, name: str) -> DatastoreConfig:
        cfg = self.get(name)
        if cfg.name.lower() == LOCAL_STORE_NAME and cfg == embedded_local_store():
            raise UsageError(f"{LOCAL_STORE_NAME} is built in and cannot be removed")
        del self.datastores[cfg.name.lower()]
        if self.default_name and self.default_name.lower() == cfg.name.lower():
            self.default_name = LOCAL_STORE_NAME
        if cfg.name.lower() == LOCAL_STORE_NAME:
            self._add(embedded_local_store())
        self.save()
        return cfg

    def save(self) -> None:
        """Write the file atomically, private to its owner (0600)."""
        stores = {c.name: c.to_dict() for c in self.datastores.values()
                  if not (c.name.lower() == LOCAL_STORE_NAME and c == embedded_local_store())}
        body: dict[str, Any] = {"default_datastore": self.default_name, "datastores": stores}
        if self.allowed_roots:
            body["allowed_roots"] = self.allowed_roots
        if self.cache:
            body["cache"] = self.cache
        directory = os.path.dirname(self.path)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        mode = stat.S_IMODE(os.stat(self.path).st_mode) if self.exists else 0o600
        text = yaml.safe_dump(body, sort_keys=False, allow_unicode=True)
        write_atomic(self.path, text.encode("utf-8"), mode=mode)
        self.exists = True
