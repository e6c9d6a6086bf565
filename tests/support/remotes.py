"""One face for a blob container (Azurite) and a file share (the Files
emulator), so a test can run against either: the workspace entry of a
datastore over it, and the real SDK to put and inspect data behind mountd's
back."""

from __future__ import annotations

import os
import posixpath

from azure.core.exceptions import ResourceExistsError

from tests.support.azurite import ACCOUNT, SDK_API_VERSION, blob_workspace_entry, credential_entry


class BlobRemote:
    kind = "blob"

    def __init__(self, azurite, container):
        self.azurite, self.client = azurite, container
        self.name = container.container_name

    def entry(self, key_env: str) -> dict:
        return blob_workspace_entry(self.azurite, self.name, key_env)

    def put(self, name: str, data: bytes) -> None:
        self.client.upload_blob(name, data, overwrite=True)

    def sibling(self, name: str) -> "BlobRemote":
        """Another container of the same Azurite, not created yet."""
        from azure.storage.blob import ContainerClient
        return BlobRemote(self.azurite, ContainerClient.from_connection_string(
            self.azurite.connection_string, name, api_version=SDK_API_VERSION))

    def create(self) -> None:
        self.client.create_container()

    def delete(self) -> None:
        self.client.delete_container()

    def mkdir(self, name: str) -> None:
        """An empty directory: a marker blob."""
        self.client.upload_blob(name, b"", metadata={"hdi_isfolder": "true"})

    def get(self, name: str) -> bytes:
        return self.client.download_blob(name).readall()

    def files(self, prefix: str = "") -> dict[str, bytes]:
        """Every file under directory `prefix` ('' for all), by name below it."""
        start = prefix.rstrip("/") + "/" if prefix else ""
        blobs = self.client.list_blobs(name_starts_with=start, include=["metadata"])
        return {b.name[len(start):]: self.get(b.name) for b in blobs if not (b.metadata or {}).get("hdi_isfolder")}

    def dirs(self, prefix: str = "") -> set[str]:
        """Directories under `prefix` that exist in their own right: markers."""
        start = prefix.rstrip("/") + "/" if prefix else ""
        return {b.name for b in self.client.list_blobs(name_starts_with=start, include=["metadata"])
                if (b.metadata or {}).get("hdi_isfolder") == "true"}


class LocalRemote:
    """A local directory as a datastore, for the behaviour all three kinds share."""

    kind = "local"

    def __init__(self, root):
        self.root = root

    def entry(self, key_env: str) -> dict:
        return {"type": "local", "root": str(self.root)}

    def put(self, name: str, data: bytes) -> None:
        path = os.path.join(self.root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)

    def files(self, prefix: str = "") -> dict[str, bytes]:
        base = os.path.join(self.root, prefix)
        out = {}
        for dirpath, _, names in os.walk(base):
            for n in names:
                with open(os.path.join(dirpath, n), "rb") as f:
                    out[os.path.relpath(os.path.join(dirpath, n), base)] = f.read()
        return out

    def dirs(self, prefix: str = "") -> set[str]:
        base = os.path.join(self.root, prefix)
        return {os.path.relpath(d, self.root) for d, _, _ in os.walk(base) if d != base}


class ShareRemote:
    kind = "file"

    def __init__(self, emulator, share):
        self.emulator, self.client = emulator, share
        self.name = share.share_name

    def entry(self, key_env: str) -> dict:
        return share_workspace_entry(self.emulator, self.name, key_env)

    def mkdir(self, name: str) -> None:
        """A real directory, and its parents."""
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            try:
                self.client.get_directory_client("/".join(parts[:i])).create_directory()
            except ResourceExistsError:
                pass

    def put(self, name: str, data: bytes) -> None:
        if posixpath.dirname(name):
            self.mkdir(posixpath.dirname(name))
        self.client.get_file_client(name).upload_file(data)

    def get(self, name: str) -> bytes:
        return self.client.get_file_client(name).download_file().readall()

    def sibling(self, name: str) -> "ShareRemote":
        """Another share of the same emulator, not created yet."""
        from azure.storage.fileshare import ShareClient
        return ShareRemote(self.emulator, ShareClient.from_connection_string(
            self.emulator.connection_string, name, api_version=SDK_API_VERSION))

    def create(self) -> None:
        self.client.create_share()

    def delete(self) -> None:
        self.client.delete_share()

    def files(self, prefix: str = "") -> dict[str, bytes]:
        out = {}
        base = prefix.strip("/")
        stack = [base]
        while stack:
            directory = stack.pop()
            try:
                items = list(self.client.get_directory_client(directory).list_directories_and_files())
            except Exception:  # noqa: BLE001 - no such directory: nothing under it
                if directory == base:
                    return {}
                raise
            for item in items:
                path = f"{directory}/{item.name}" if directory else item.name
                if item.is_directory:
                    stack.append(path)
                else:
                    out[path[len(base) + 1:] if base else path] = self.get(path)
        return out

    def dirs(self, prefix: str = "") -> set[str]:
        """Every directory under `prefix`, empty ones included."""
        found, stack = set(), [prefix.strip("/")]
        while stack:
            directory = stack.pop()
            for item in self.client.get_directory_client(directory).list_directories_and_files():
                if item.is_directory:
                    path = f"{directory}/{item.name}" if directory else item.name
                    found.add(path)
                    stack.append(path)
        return found


def share_workspace_entry(emulator, share: str, key_env: str = "AZURITE_ACCOUNT_KEY", *,
                          managed_identity: bool = False, client_id: str | None = None) -> dict:
    """A workspace-file datastore mapping for a share of the Files emulator
    (the emulator's account and key are Azurite's well-known ones)."""
    return {"type": "azure_file", "account_name": ACCOUNT, "share_name": share,
            "endpoint": emulator.account_url,
            "credential": credential_entry(key_env, managed_identity, client_id)}


def datastore_entry(server, name: str, key_env: str = "AZURITE_ACCOUNT_KEY", *, managed_identity: bool = False,
                    client_id: str | None = None) -> dict:
    """A workspace-file datastore mapping for container or share `name` of
    `server`, an Azurite or a Files emulator of any lane (http, https,
    oauth): the account key from $key_env, or a managed identity
    ({"managed_identity": True}, plus `client_id` for a user-assigned one)."""
    from tests.emulators.fileshare import FileShareEmulator
    make = share_workspace_entry if isinstance(server, FileShareEmulator) else blob_workspace_entry
    return make(server, name, key_env, managed_identity=managed_identity, client_id=client_id)
