"""Azure Blob container backend.

Directories are virtual: they exist through '/' in blob names and through
zero-byte marker blobs with metadata `hdi_isfolder=true` (as written by the
Data Lake tools and blobfuse). Large files go up as blocks staged in parallel
and committed in one block list with the whole file's MD5, so a download can
verify what it got.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
from email.utils import parsedate_to_datetime
from typing import Iterator, Mapping
from urllib.parse import unquote

from mountd.config.credentials import Credential
from mountd.config.datastores import DatastoreConfig
from mountd.errors import AlreadyExists, NotEmpty, NotFound, Stale, Unreachable
from mountd.storage.azure_common import content_type, raise_for_status, upload_pieces
from mountd.storage.azure_http import HttpError, RangeReader, Signer, raise_for_answer
from mountd.storage.azure_store import AzureStore
from mountd.paths import normalize_path
from mountd.storage.base import Entry, NameLimits, ProgressCallback
from mountd.storage.retry import policy

MARKER_KEY = "hdi_isfolder"
SINGLE_PUT_MAX = 32 * 1024 * 1024  # files up to this size go up in one request
BLOCK_SIZE = 8 * 1024 * 1024  # staged block size for larger files
UPLOAD_CONCURRENCY = 8  # blocks in flight per large file
LIST_PAGE = 5000  # the service's maximum page


def _entry_from_headers(path: str, headers: Mapping[str, str]) -> Entry:
    """The entry a HEAD of a blob describes (header names in lower case)."""
    marker = headers.get(f"x-ms-meta-{MARKER_KEY}", "").lower() == "true"
    md5 = headers.get("content-md5")
    modified = headers.get("last-modified")
    return Entry(path=path, is_dir=marker, size=0 if marker else int(headers.get("content-length") or 0),
                 mtime=parsedate_to_datetime(modified).timestamp() if modified else 0.0,
                 etag=_etag(headers.get("etag")), md5=base64.b64decode(md5) if md5 else None)


def _listing_page(reader: RangeReader, container: str, prefix: str, delimiter: str | None,
                  marker: str | None, page: int) -> tuple[list, str | None]:
    """One page of a container listing: ([Entry or ('prefix', name)], next marker)."""
    query = {"restype": "container", "comp": "list", "include": "metadata", "maxresults": str(page)}
    if prefix:
        query["prefix"] = prefix
    if delimiter:
        query["delimiter"] = delimiter
    if marker:
        query["marker"] = marker
    root = reader.get_xml(container, query)
    items: list[Entry | tuple[str, str]] = []
    blobs = root.find("Blobs")
    for node in (blobs if blobs is not None else ()):
        name = node.findtext("Name") or ""
        if node.find("Name[@Encoded='true']") is not None:
            name = unquote(name)
        if node.tag == "BlobPrefix":
            items.append(("prefix", name))
            continue
        meta = node.find("Metadata")
        marker_blob = meta is not None and any(
            c.tag.lower() == MARKER_KEY and (c.text or "").lower() == "true" for c in meta)
        md5 = node.findtext("Properties/Content-MD5")
        modified = node.findtext("Properties/Last-Modified")
        items.append(Entry(
            path=name, is_dir=marker_blob,
            size=0 if marker_blob else int(node.findtext("Properties/Content-Length") or 0),
            mtime=parsedate_to_datetime(modified).timestamp() if modified else 0.0,
            etag=_etag(node.findtext("Properties/Etag")),
            md5=base64.b64decode(md5) if md5 else None))
    return items, root.findtext("NextMarker") or None


def _etag(value: str | None) -> str | None:
    """Etags without quotes: listings give them bare, HEAD quoted."""
    return value.strip('"') if value else value


# Azure's "Naming and Referencing Containers, Blobs, and Metadata": a blob
# name is 1 to 1 024 characters, in at most 254 path segments.
BLOB_NAME_LIMITS = NameLimits(component=1024, path=1024, segments=254)


class BlobStore(AzureStore):

    check_query = {"restype": "container", "comp": "list", "maxresults": "1"}

    def __init__(self, cfg: DatastoreConfig, credential: Credential):
        assert cfg.container_name is not None  # required for azure_blob (config/datastores)
        self._retry = policy()
        self.account_url, signer = Signer.for_store(cfg, credential, "blob")
        super().__init__(cfg.container_name, RangeReader(self.account_url, signer, retry=self._retry),
                         f"blob container {cfg.container_name!r} at {self.account_url}", UPLOAD_CONCURRENCY,
                         "blob-upload")
        self.container_name = cfg.container_name

    def name_limits(self) -> NameLimits:
        return BLOB_NAME_LIMITS

    def _make_service(self):
        from azure.storage.blob import BlobServiceClient

        from mountd.storage.sdk import client_credential, client_options
        return BlobServiceClient(self.account_url, client_credential(self._reader.signer),
                                 **client_options(self._retry))

    @property
    def container(self):
        return self.service.get_container_client(self.container_name)

    # -- metadata -------------------------------------------------------------
    def _create_target(self) -> None:
        self.container.create_container()

    def _properties(self, path: str) -> Entry | None:
        """The blob at `path` itself (a marker is a directory), or None."""
        status, headers = self._head(path)
        if status == 404 and headers.get("x-ms-error-code", "BlobNotFound") in ("BlobNotFound", ""):
            return None
        raise_for_answer(status, headers, f"{path} in {self.description}", self.description)
        return _entry_from_headers(path, headers)

    def stat(self, path: str) -> Entry:
        path = normalize_path(path)
        if not path:
            self.check()
            return Entry(path="", is_dir=True)
        entry = self._properties(path)
        if entry is not None:
            return entry
        if self._has_children(path):
            return Entry(path=path, is_dir=True)
        raise NotFound(f"{path} does not exist in {self.description}")

    def _has_children(self, path: str) -> bool:
        try:
            items, _ = _listing_page(self._reader, self.container_name, path + "/", None, None, 1)
        except HttpError as e:
            raise_for_status(e.status, e.code, f"{path} in {self.description}", self.description)
        except OSError as e:
            raise Unreachable(f"cannot reach {self.description}: {e}") from None
        return bool(items)

    def _pages(self, prefix: str, delimiter: str | None) -> Iterator:
        def fetch(marker: str | None):
            try:
                return _listing_page(self._reader, self.container_name, prefix, delimiter, marker, LIST_PAGE)
            except HttpError as e:
                raise_for_status(e.status, e.code, f"{prefix or '/'} in {self.description}", self.description)
            except OSError as e:
                raise Unreachable(f"cannot reach {self.description}: {e}") from None
        return self._paged(fetch)

    def list_dir(self, path: str) -> Iterator[Entry]:
        path = normalize_path(path)
        prefix = path + "/" if path else ""
        seen_dirs: set[str] = set()
        # A file whose name is also a directory prefix ('a/x' beside 'a/x/y')
        # is hidden behind the directory. Listing order is lexicographic, so a
        # file is held back only while the names that follow still start with
        # its name ('a/x-1', 'a/x.txt' sort between 'a/x' and 'a/x/').
        pending: list[Entry] = []
        found = False
        for item in self._pages(prefix, "/"):
            found = True
            is_prefix = isinstance(item, tuple)
            raw_name = item[1] if is_prefix else item.path
            name = raw_name.rstrip("/")
            child = name[len(prefix):]
            if not name.startswith(prefix) or not child or "/" in child or child in (".", ".."):
                continue  # not a child that could be asked for by this name (a broken or hostile listing)
            while pending and not name.startswith(pending[0].path):
                yield pending.pop(0)
            if is_prefix or item.is_dir:
                pending = [p for p in pending if p.path != name]
                if name and name != path and name not in seen_dirs:
                    seen_dirs.add(name)
                    yield Entry(path=name, is_dir=True) if is_prefix else item
            elif raw_name != name or name == path:
                continue  # a blob named like a directory ('a/'): not addressable as a file
            elif name not in seen_dirs:
                pending.append(item)
        yield from pending
        if not found and path and not self.stat(path).is_dir:
            raise NotFound(f"{path} is not a directory in {self.description}")

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        for item in self._pages(prefix, None):
            if not isinstance(item, tuple) and not item.path.endswith("/"):
                yield item

    # -- data -----------------------------------------------------------------
    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> Entry:
        path = normalize_path(path)
        with self._errors(path):
            self.container.get_blob_client(path).upload_blob(
                data, overwrite=overwrite, length=len(data),
                content_settings=_content_settings(path, hashlib.md5(data).digest()))
        return self.stat(path)

    def write_file(self, path: str, local_path: str, overwrite: bool = True,
                   progress: ProgressCallback | None = None) -> Entry:
        path = normalize_path(path)
        size = os.path.getsize(local_path)
        blob = self.container.get_blob_client(path)
        if size <= SINGLE_PUT_MAX:
            with open(local_path, "rb") as f:
                data = f.read()
            md5 = hashlib.md5(data).digest()
            with self._ours_if_answer_lost(path, overwrite, md5, len(data)), self._errors(path):
                # Content-MD5 makes storage check the bytes that arrived against
                # the file's (a mismatch fails the request); the stored MD5
                # property comes from the content settings.
                blob.upload_blob(data, overwrite=overwrite, length=len(data),
                                 content_settings=_content_settings(path, md5),
                                 headers={"Content-MD5": base64.b64encode(md5).decode()})
            if progress:
                progress(len(data))
            return self.stat(path)
        if not overwrite:
            try:
                self.stat(path)
                raise AlreadyExists(f"{path} already exists in {self.description}")
            except NotFound:
                pass
        return self._upload_blocks(blob, path, local_path, overwrite, progress)

    def _upload_blocks(self, blob, path, local_path, overwrite, progress) -> Entry:
        from azure.core import MatchConditions
        def stage(index: int, _offset: int, data: bytes) -> None:
            with self._errors(path):
                blob.stage_block(_block_id(index), data, length=len(data))

        with open(local_path, "rb") as f:
            md5, count = upload_pieces(self._uploads, self._upload_slots, f, BLOCK_SIZE, stage, progress)
        conditions = {} if overwrite else dict(match_condition=MatchConditions.IfMissing)
        with self._ours_if_answer_lost(path, overwrite, md5, os.path.getsize(local_path)), self._errors(path):
            blob.commit_block_list([_block_id(i) for i in range(count)],
                                   content_settings=_content_settings(path, md5), **conditions)
        return self.stat(path)

    @contextlib.contextmanager
    def _ours_if_answer_lost(self, path: str, overwrite: bool, md5: bytes, size: int):
        """A write that must not replace an existing blob, retried after its
        answer was lost (a reset or timeout once storage had the request),
        finds the blob it wrote itself: "already exists" (409) on a put,
        "condition not met" (412) on a commit. When the call was retried and
        the blob there has exactly our size and MD5, it is ours; otherwise
        it stays AlreadyExists (an existing blob is skipped, not replaced)."""
        from mountd.storage.sdk import RETRIES_SEEN
        retries_before = RETRIES_SEEN.count
        try:
            yield
        except (AlreadyExists, Stale) as e:
            if overwrite:
                raise
            rid = f" (request id {e.request_id})" if getattr(e, "request_id", None) else ""
            if RETRIES_SEEN.count == retries_before:
                raise AlreadyExists(f"{path} already exists in {self.description}{rid}") from None
            try:
                there = self.stat(path)
            except NotFound:
                there = None
            if there is None or there.is_dir or there.size != size or there.md5 != md5:
                raise AlreadyExists(f"{path} already exists in {self.description}{rid}") from None

    def delete(self, path: str) -> None:
        path = normalize_path(path)
        with self._errors(path):
            self.container.get_blob_client(path).delete_blob()

    def mkdir(self, path: str) -> None:
        path = normalize_path(path)
        parts = path.split("/")
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            try:
                if self.stat(sub).is_dir:
                    continue
                raise AlreadyExists(f"{sub} exists as a file in {self.description}")
            except NotFound:
                with self._errors(sub):
                    self.container.get_blob_client(sub).upload_blob(
                        b"", overwrite=True, metadata={MARKER_KEY: "true"})

    def rmdir(self, path: str) -> None:
        path = normalize_path(path)
        if self._has_children(path):
            raise NotEmpty(f"{path} is not empty in {self.description}")
        entry = self._properties(path)
        if entry is not None and entry.is_dir:  # no blob: a virtual directory with no children is gone already
            self.delete(path)

    # A copy storage has not finished when it answers is polled: first after
    # this many seconds, then twice as long each time up to the maximum.
    _COPY_POLL_FIRST = 0.1
    _COPY_POLL_MAX = 2.0

    def rename(self, src: str, dst: str) -> None:
        """Blob storage has no rename: the service copies the blob (Copy
        Blob, asynchronous), and the source is deleted once the copy has
        succeeded, only if it is still the version copied. A copy that
        fails or does not finish in time leaves the source as it was and
        no target (one that was there is replaced when the copy starts).

        Not Copy Blob From URL (synchronous): it takes sources of up to
        256 MiB, and reads its source as an outside caller would, so only
        a SAS in the source's URL or an OAuth token in
        x-ms-copy-source-authorization lets it read a private blob. Copy
        Blob takes a blob of any size, and reads a source in the same
        account with the request's own Shared Key or token; with a SAS the
        source URL carries the SAS (the SDK client's URLs do), as a SAS on
        the request covers only the destination."""
        from azure.core import MatchConditions
        src, dst = normalize_path(src), normalize_path(dst)
        source = self.container.get_blob_client(src)
        target = self.container.get_blob_client(dst)
        with self._errors(src):
            props = source.get_blob_properties()
            # The copy reads the source only while its etag is this one; a
            # change while the copy is pending fails the copy.
            started = target.start_copy_from_url(source.url, source_etag=props.etag,
                                                 source_match_condition=MatchConditions.IfNotModified)
        if started.get("copy_status") != "success":
            self._await_copy(target, dst, started["copy_id"], props.size)
        with self._errors(src):
            source.delete_blob(etag=props.etag, match_condition=MatchConditions.IfNotModified)

    def _copy_wait(self, size: int) -> float:
        """Seconds a rename waits for the copy of a blob of `size` bytes.
        A copy within an account usually ends at once; one the service
        schedules runs on spare bandwidth, with no time promised (pending
        copies time out after two weeks), so allow a minute plus the time
        to move the bytes at a modest 10 MiB/s."""
        return 60.0 + size / (10 * 1024 * 1024)

    def _await_copy(self, target, dst: str, copy_id: str, size: int) -> None:
        """Poll `target` until its pending copy `copy_id` ends. Returns once
        it has succeeded; otherwise (failed, aborted, or still pending when
        the wait is over: then aborted) removes what the copy left at the
        target and raises StorageError."""
        import time

        from mountd.errors import MountdError, StorageError
        wait = self._copy_wait(size)
        deadline = time.monotonic() + wait
        delay, aborted = self._COPY_POLL_FIRST, False
        while True:
            time.sleep(max(0.0, min(delay, deadline - time.monotonic())))
            delay = min(delay * 2, self._COPY_POLL_MAX)
            with self._errors(dst):
                copy = target.get_blob_properties().copy
            if copy.id != copy_id:
                # Written or copied over by someone else meanwhile: that is
                # theirs now, and the source stays.
                raise StorageError(f"{dst} in {self.description} was replaced while a rename copied to it")
            if copy.status == "success":
                return  # (also when it ended just as it was being aborted)
            if copy.status != "pending" or aborted:
                problem = (f"the copy was not done after {wait:.1f} s and was aborted" if aborted
                           else f"the copy {copy.status}: {copy.status_description or 'no reason given'}")
                break
            if time.monotonic() >= deadline:
                try:
                    with self._errors(dst):
                        target.abort_copy(copy_id)
                except MountdError:
                    pass  # it may have ended meanwhile: the next look decides
                aborted = True
        left = self._discard_copy(target, dst, copy_id)
        raise StorageError(f"renaming to {dst} in {self.description}: {problem}{left}")

    def _discard_copy(self, target, dst: str, copy_id: str) -> str:
        """Delete what the unfinished copy `copy_id` left at `target` (an
        empty or partial blob), unless it ended in success after all or was
        replaced. Returns a note for the error message if it is still there."""
        from azure.core import MatchConditions

        from mountd.errors import MountdError
        try:
            with self._errors(dst):
                props = target.get_blob_properties()
                if props.copy.id == copy_id and props.copy.status != "success":
                    target.delete_blob(etag=props.etag, match_condition=MatchConditions.IfNotModified)
        except NotFound:
            pass
        except MountdError as e:
            return f" (what it left at {dst} could not be removed: {e})"
        return ""


def _block_id(index: int) -> str:
    return base64.b64encode(f"{index:08d}".encode()).decode()


def _content_settings(path: str, md5: bytes):
    from azure.storage.blob import ContentSettings
    return ContentSettings(content_type=content_type(path), content_md5=md5)  # type: ignore[arg-type]  # SDK hint: bytearray
