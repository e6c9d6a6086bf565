"""Azure File share backend.

A share is a real file system, not a flat namespace: directories are created,
listed and deleted in their own right (so an empty one exists and `walk`
reports it), a file must be created with its size before its ranges are
written (4 MiB at most per Put Range), and names are case-insensitive but
case-preserving.

Writes. A file is created under a temporary name in its target directory
(`.mountd-<hex>.partial`, hidden from listings; in the share's root where
that name would make the path too long for the service), filled with ranges sent in
parallel, given the whole file's MD5, then moved onto its target by the
service's own rename, which replaces an existing file only when asked. So a
reader never sees a half-written file, and `overwrite=False` is decided by
the service in one step rather than by a check that could be stale. A
process killed mid-upload leaves its temporary file behind (hidden).

Reads. The File service refuses conditional headers (If-Match) on reads, so
a read pinned to an etag compares the etag each response carries before
using its body (`RangeReader(conditional=False)`) and raises Stale if the
file has changed. What this cannot see is a write that lands while one
response is in flight: the service gives no way to make a single GET
atomic with respect to Put Range. A file replaced by mountd itself (through
the rename above) is never affected: the old file's bytes stay intact until
its response ends.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import posixpath
import uuid
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from email.utils import parsedate_to_datetime
from typing import BinaryIO, Iterator
from urllib.parse import unquote

from mountd.config.credentials import TOKEN_KINDS, Credential
from mountd.config.datastores import DatastoreConfig
from mountd.errors import AlreadyExists, NotFound, StorageError, UsageError
from mountd.storage.azure_common import content_type, upload_pieces
from mountd.storage.azure_http import RangeReader, Signer, raise_for_answer
from mountd.storage.azure_store import AzureStore
from mountd.paths import join, normalize_path
from mountd.storage.base import Entry, NameLimits, ProgressCallback

RANGE_SIZE = 4 * 1024 * 1024  # the service's maximum for one Put Range
UPLOAD_CONCURRENCY = 8  # ranges in flight per large file
LIST_PAGE = 5000  # the service's maximum page
WALK_CONCURRENCY = 8  # directories listed at once by walk
# Azure's "Naming and Referencing Shares, Directories, Files, and Metadata":
# a directory or file name is at most 255 characters, a whole path 2 048.
SHARE_NAME_LIMITS = NameLimits(component=255, path=2048)
TEMP_PREFIX, TEMP_SUFFIX = ".mountd-", ".partial"


def is_temporary(name: str) -> bool:
    """A file an upload is still filling (see the module docstring)."""
    base = posixpath.basename(name)
    return base.startswith(TEMP_PREFIX) and base.endswith(TEMP_SUFFIX)


def _etag(value: str | None) -> str | None:
    """Etags without quotes, as the blob backend keeps them."""
    return value.strip('"') if value else None


def _http_time(value: str | None) -> float:
    return parsedate_to_datetime(value).timestamp() if value else 0.0


def _listing_page(root, directory: str) -> tuple[list[Entry], str | None]:
    """Entries of one page of a directory listing, and the next marker."""
    items = []
    for node in root.find("Entries") if root.find("Entries") is not None else ():
        name_node = node.find("Name")
        name = name_node.text or ""
        if name_node.get("Encoded") == "true":
            name = unquote(name)
        if is_temporary(name):
            continue
        path = f"{directory}/{name}" if directory else name
        props = node.find("Properties")
        props = props if props is not None else node
        mtime = _http_time(props.findtext("Last-Modified"))
        if node.tag == "Directory":
            items.append(Entry(path=path, is_dir=True, mtime=mtime))
        else:
            items.append(Entry(path=path, is_dir=False, size=int(props.findtext("Content-Length") or 0),
                               mtime=mtime, etag=_etag(props.findtext("Etag"))))
    return items, root.findtext("NextMarker") or None


class FileShareStore(AzureStore):

    check_query = {"restype": "directory", "comp": "list", "maxresults": "1"}

    def __init__(self, cfg: DatastoreConfig, credential: Credential):
        assert cfg.share_name is not None  # required for azure_file (config/datastores)
        lean_headers = {"x-ms-allow-trailing-dot": "true"}
        self._backup_intent = credential.kind in TOKEN_KINDS
        if self._backup_intent:
            # The File service takes OAuth tokens on its REST API only with the
            # "backup" intent: access as backup software has it, granted by the
            # Storage File Data Privileged Reader/Contributor roles, bypassing
            # the files' own ACLs.
            lean_headers["x-ms-file-request-intent"] = "backup"
        self.account_url, signer = Signer.for_store(cfg, credential, "file")
        # (the shared API version is past 2022-11-02, the first that accepts
        # OAuth tokens, lists etags and timestamps, and keeps trailing dots)
        reader = RangeReader(self.account_url, signer, conditional=False, headers=lean_headers)
        super().__init__(cfg.share_name, reader, f"file share {cfg.share_name!r} at {self.account_url}",
                         UPLOAD_CONCURRENCY, "share-upload")
        self.share_name = cfg.share_name

    def name_limits(self) -> NameLimits:
        return SHARE_NAME_LIMITS

    def _make_service(self):
        from azure.storage.fileshare import ShareServiceClient

        from mountd.storage.sdk import client_credential, client_options
        # Names are kept exactly: without these the service silently drops a
        # trailing dot ("run." would land as "run").
        options = client_options(allow_trailing_dot=True, allow_source_trailing_dot=True)
        if self._backup_intent:
            options["token_intent"] = "backup"
        return ShareServiceClient(self.account_url, client_credential(self._reader.signer), **options)

    @property
    def share(self):
        return self.service.get_share_client(self.share_name)

    # -- metadata -------------------------------------------------------------
    def _create_target(self) -> None:
        self.share.create_share()

    def stat(self, path: str) -> Entry:
        path = normalize_path(path)
        if not path:
            self.check()
            return Entry(path="", is_dir=True)
        # Files and directories are separate resources: ask for a file first
        # (the common case), then for a directory.
        what = f"{path} in {self.description}"
        status, headers = self._head(path)
        if status < 300:
            md5 = headers.get("content-md5")
            return Entry(path=path, is_dir=False, size=int(headers.get("content-length") or 0),
                         mtime=_http_time(headers.get("last-modified")), etag=_etag(headers.get("etag")),
                         md5=base64.b64decode(md5) if md5 else None)
        if status != 404:
            raise_for_answer(status, headers, what, self.description)
        status, headers = self._head(path, {"restype": "directory"})
        raise_for_answer(status, headers, what, self.description)
        return Entry(path=path, is_dir=True, mtime=_http_time(headers.get("last-modified")))

    def _list_page(self, directory: str, marker: str | None, name_prefix: str = "") -> tuple[list[Entry], str | None]:
        query = {"restype": "directory", "comp": "list", "include": "Timestamps,ETag", "maxresults": str(LIST_PAGE)}
        if marker:
            query["marker"] = marker
        if name_prefix:
            query["prefix"] = name_prefix
        with self._reads(directory):
            root = self._reader.get_xml(join(self.share_name, directory), query)
        return _listing_page(root, directory)

    def list_dir(self, path: str) -> Iterator[Entry]:
        path = normalize_path(path)

        def fetch(marker: str | None):
            try:
                return self._list_page(path, marker)
            except NotFound:
                raise NotFound(f"{path} is not a directory in {self.description}") from None
        return self._paged(fetch)

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        # The service lists one directory at a time, so a deep tree means many
        # listings: they run concurrently, page by page, and entries are
        # yielded as pages arrive (in no particular order).
        top, _, name_prefix = prefix.rpartition("/")
        try:
            top = normalize_path(top)
        except UsageError:
            return
        pool = ThreadPoolExecutor(WALK_CONCURRENCY, thread_name_prefix="share-walk")
        pending = {}

        def submit(directory: str, marker: str | None, start: str = "") -> None:
            pending[pool.submit(self._list_page, directory, marker, start)] = (directory, start)

        submit(top, None, name_prefix)  # the service narrows the first listing to the prefix
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    directory, start = pending.pop(fut)
                    try:
                        items, marker = fut.result()
                    except NotFound:
                        continue  # no such directory, or it went away meanwhile
                    if marker:
                        submit(directory, marker, start)
                    for entry in items:
                        # The service matches prefixes case-insensitively; the
                        # interface's prefix is an exact string prefix.
                        if entry.path.startswith(prefix):
                            if entry.is_dir:
                                submit(entry.path, None)
                            yield entry
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    # -- data -----------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> Entry:
        return self._write(normalize_path(path), len(data), io.BytesIO(data), overwrite, None)

    def write_file(self, path: str, local_path: str, overwrite: bool = True,
                   progress: ProgressCallback | None = None) -> Entry:
        with open(local_path, "rb") as f:
            return self._write(normalize_path(path), os.fstat(f.fileno()).st_size, f, overwrite, progress)

    def _write(self, path: str, size: int, source: BinaryIO, overwrite: bool, progress) -> Entry:
        if not path:
            raise UsageError(f"cannot write a file at the root of {self.description}")
        if not overwrite and size > RANGE_SIZE:
            # Only to avoid sending data that would be refused: the rename
            # at the end is what decides.
            try:
                self.stat(path)
                raise AlreadyExists(f"{path} already exists in {self.description}")
            except NotFound:
                pass
        temp_name = f"{TEMP_PREFIX}{uuid.uuid4().hex}{TEMP_SUFFIX}"
        temp_path = join(posixpath.dirname(path), temp_name)
        if SHARE_NAME_LIMITS.too_long(temp_path):
            # a path near the service's limit with a short last name: the
            # temporary name beside it would be refused, the share's root takes it
            temp_path = temp_name
        temp = self.share.get_file_client(temp_path)
        from azure.storage.fileshare import ContentSettings
        settings = ContentSettings(content_type=content_type(path))
        small = size <= RANGE_SIZE
        if small:
            # One range: its MD5 is known before the file is created.
            data = source.read()
            size = len(data)
            settings.content_md5 = hashlib.md5(data).digest()  # type: ignore[assignment]  # SDK hint: bytearray
        renamed: dict = {}
        try:
            self._create_file(temp, path, size, settings)
            if small and size:
                with self._errors(path):
                    temp.upload_range(data, 0, size)
            elif not small:
                def put(_index: int, offset: int, piece: bytes) -> None:
                    with self._errors(path):
                        temp.upload_range(piece, offset, len(piece))

                md5, _ = upload_pieces(self._uploads, self._upload_slots, source, RANGE_SIZE, put, progress)
                if source.tell() != size:
                    raise StorageError(f"{path}: the local file changed size while it was being uploaded")
                settings.content_md5 = md5  # type: ignore[assignment]  # the SDK's hint says bytearray
                with self._errors(path):
                    temp.set_http_headers(settings)
            with self._errors(path):
                temp.rename_file(path, overwrite=overwrite,
                                 raw_response_hook=lambda response: renamed.update(response.http_response.headers))
        except BaseException:
            self._discard(temp)
            raise
        if small and progress:
            progress(size)
        if not renamed.get("ETag") or not renamed.get("Last-Modified"):
            return self.stat(path)
        return Entry(path=path, is_dir=False, size=size, mtime=_http_time(renamed["Last-Modified"]),
                     etag=_etag(renamed["ETag"]), md5=settings.content_md5)  # type: ignore[arg-type]  # bytes, set above

    def _create_file(self, client, path: str, size: int, settings) -> None:
        """Create the file `client` names, with its size; makes the missing
        parent directories of `path` (its final name) first if need be."""
        try:
            with self._errors(path):
                client.create_file(size, content_settings=settings)
            return
        except NotFound:  # a parent directory is missing
            self.mkdir(posixpath.dirname(path))
        with self._errors(path):
            client.create_file(size, content_settings=settings)

    def _discard(self, client) -> None:
        """Remove a temporary file after a failed upload, best effort."""
        try:
            with self._errors(client.file_name):
                client.delete_file()
        except Exception:  # noqa: BLE001 - the upload's own error is the one to report
            pass

    def delete(self, path: str) -> None:
        path = normalize_path(path)
        with self._errors(path):
            self.share.get_file_client(path).delete_file()

    def mkdir(self, path: str) -> None:
        path = normalize_path(path)
        if not path:
            return
        try:
            with self._errors(path):
                self.share.get_directory_client(path).create_directory()
            return
        except AlreadyExists:
            return self._must_be_dir(path)
        except NotFound:  # a parent is missing: make it, then this one
            self.mkdir(posixpath.dirname(path))
        try:
            with self._errors(path):
                self.share.get_directory_client(path).create_directory()
        except AlreadyExists:  # made meanwhile by another writer
            self._must_be_dir(path)

    def _must_be_dir(self, path: str) -> None:
        if not self.stat(path).is_dir:
            raise AlreadyExists(f"{path} exists as a file in {self.description}")

    def rmdir(self, path: str) -> None:
        path = normalize_path(path)
        with self._errors(path):
            self.share.get_directory_client(path).delete_directory()

    def rename(self, src: str, dst: str) -> None:
        """The service's rename: atomic, and it replaces a file at `dst`.
        Works for directories too; missing parents of `dst` are made."""
        src, dst = normalize_path(src), normalize_path(dst)
        if self.stat(src).is_dir:
            move = self.share.get_directory_client(src).rename_directory
        else:
            move = self.share.get_file_client(src).rename_file
        try:
            with self._errors(src):
                move(dst, overwrite=True)
            return
        except NotFound:
            if not posixpath.dirname(dst):
                raise
            self.mkdir(posixpath.dirname(dst))  # the source may be gone instead: then this fails again
        with self._errors(src):
            move(dst, overwrite=True)

    def rename_dir(self, src: str, dst: str) -> None:
        """The service renames directories itself (see rename)."""
        self.rename(src, dst)

