"""Storage backends behind one interface (`ObjectStore`), and `open_store`,
which builds the right one for a datastore definition."""

from __future__ import annotations

from mountd.config import credentials
from mountd.config.datastores import DatastoreConfig
from mountd.errors import ConfigError
from mountd.paths import join, normalize_path
from mountd.storage.base import Entry, ObjectStore

__all__ = ["Entry", "ObjectStore", "join", "normalize_path", "open_store", "resolve_credential"]


def resolve_credential(cfg: DatastoreConfig) -> credentials.Credential:
    """An Azure datastore's credential, read now: ConfigError if its secret
    is missing, or if it is a token and the endpoint is not https."""
    cred = credentials.resolve(cfg.credential, f"datastore {cfg.name!r}")
    if cred.kind in credentials.TOKEN_KINDS:
        credentials.require_https(cfg.account_url(), f"datastore {cfg.name!r}")
    return cred


def open_store(cfg: DatastoreConfig, create: bool = False) -> ObjectStore:
    """Open the store a datastore names; with `create`, make its container,
    share or root directory if missing. Reads the credential now."""
    if cfg.type == "local":
        from mountd.storage.local import LocalStore
        from mountd.config.workspace import LOCAL_STORE_NAME
        # The embedded store is mountd's own: it comes into being when used.
        assert cfg.root is not None  # required for a local datastore (config/datastores)
        return LocalStore(cfg.root, create=create or cfg.name.lower() == LOCAL_STORE_NAME)
    cred = resolve_credential(cfg)
    store: ObjectStore
    if cfg.type == "azure_blob":
        from mountd.storage.blob import BlobStore
        store = BlobStore(cfg, cred)
    elif cfg.type == "azure_file":
        from mountd.storage.fileshare import FileShareStore
        store = FileShareStore(cfg, cred)
    else:
        raise ConfigError(f"datastore {cfg.name!r}: unknown type {cfg.type!r}")
    if create:
        store.create()
    return store
