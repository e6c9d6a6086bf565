"""Protocol-level emulator of the Azure Files (file share) REST API, for tests.

Azurite only emulates the blob, queue and table services, so tests that drive
the real ``azure-storage-file-share`` SDK need something to talk to.  This
module is that something: a small HTTP/1.1 server built only on the standard
library that speaks the wire protocol of the File service closely enough for
the SDK to work unmodified, including its typed exceptions and error codes.

Running it
----------
Standalone::

    python -m tests.emulators.fileshare --host 127.0.0.1 --port 0 [--location DIR]

prints exactly one line, ``listening on http://HOST:PORT/devstoreaccount1``,
and serves until interrupted (SIGINT/SIGTERM).  ``--port 0`` picks a free
port; ``--verbose`` logs requests to stderr; ``--cert FILE --key FILE``
serve HTTPS instead (``https://`` in that line).  From Python::

    with FileShareEmulator() as emulator:
        client = ShareServiceClient.from_connection_string(emulator.connection_string)

URLs are path-style like Azurite:
``http://127.0.0.1:PORT/devstoreaccount1/<share>/<dir>/<file>``.  The only
account is ``devstoreaccount1`` with the well-known development key
``ACCOUNT_KEY``.

Storage layout
--------------
Everything lives under ``--location`` (a temporary directory by default,
removed again on shutdown):

* ``shares/<share>/<dir>/<file>``: file content, stored under the decoded
  names, so the tree can be inspected by hand.  Names are validated (no ``/``,
  ``\\``, NUL, ``.``/``..`` or other characters Azure rejects) and every path
  is checked to stay below the share's directory.
* ``meta/<share>.json``: properties that have no natural place on disk
  (ETags, SMB timestamps and attributes, file ids, metadata, content headers,
  written ranges).  Rewritten atomically after every change.

Like the real service the namespace is case-insensitive but case-preserving,
and trailing dots are stripped from names unless
``x-ms-allow-trailing-dot: true`` is sent.

Authentication
--------------
* SharedKey (``Authorization: SharedKey devstoreaccount1:<sig>``), verified
  with the 2009-09-19+ string-to-sign of the File service.  For path-style
  URLs the canonicalized resource is ``/devstoreaccount1`` + the encoded
  request path (the form the SDK signs); the host-style form without the
  duplicated account segment is accepted too.  A bad signature gives
  403 AuthenticationFailed; no credentials give 401 NoAuthenticationInformation.
* Account SAS (``generate_account_sas``): signature, start/expiry, signed
  services (must include ``f``), resource types, permissions, protocol and IP.
* Service SAS for a share (``generate_share_sas``, ``sr=s``) or a file
  (``generate_file_sas``, ``sr=f``): signature, start/expiry, scope,
  permissions, protocol, IP and the ``rscc``/``rscd``/``rsce``/``rscl``/``rsct``
  response-header overrides.  Stored access policies (``si``) and user
  delegation SAS are rejected with 403.
* OAuth bearer tokens (``Authorization: Bearer <JWT>``), with the rules of
  Azure Files OAuth over REST: only over HTTPS (else 403 AuthenticationFailed),
  only with ``x-ms-version`` 2022-11-02 or later (else 403), only with
  ``x-ms-file-request-intent: backup`` (else 400 MissingRequiredHeader, or
  InvalidHeaderValue for another value), and share- or service-level
  operations only from 2024-11-04 (else 409
  FileOAuthManagementApiRestrictedToSrp).  The token's claims are checked as
  Azurite's ``--oauth basic`` checks them: it must decode, carry ``iat``,
  ``nbf`` and ``exp`` with the current time within nbf..exp, an ``iss`` of a
  known Entra issuer (https://sts.windows.net/... and the national clouds')
  and an ``aud`` of storage (``https://storage.azure.com``, storage's app id,
  or ``https://devstoreaccount1.file.core.windows.net``).  A token that fails
  gets 401 InvalidAuthenticationInfo with a ``WWW-Authenticate`` Bearer
  challenge, as from the service.  The signature is not checked and no RBAC
  role is: any acceptable token may do anything.
* Not supported: SharedKeyLite.  The request date is required but its clock
  skew is not checked, so clients with frozen clocks work.

Supported operations
--------------------
* Service: List Shares (prefix, marker, maxresults, include=metadata),
  Get/Set Service Properties (the XML is stored and echoed back verbatim).
* Share: Create, Get Properties, Delete, Set Metadata, Set Properties (quota),
  Get Stats, Get/Set ACL (stored verbatim, not enforced).
* Directory: Create, Get Properties, Delete (DirectoryNotEmpty), Set Metadata,
  Set Properties, List Directories and Files (prefix, marker/NextMarker,
  maxresults, include=Timestamps,ETag,Attributes,PermissionKey,
  ``x-ms-file-extended-info``; ``page_limit``/``--page-limit`` ends pages
  early, as the service may), Rename, List Handles (always empty), Force
  Close Handles (closes nothing).
* File: Create, Get (full or ranged via ``x-ms-range``/``Range``, optional
  ``x-ms-range-get-content-md5``), Get Properties (HEAD), Set Properties /
  HTTP headers (including resize and ``x-ms-content-md5``), Set Metadata,
  Delete, Put Range (update/clear, max 4 MiB, Content-MD5 checked), List
  Ranges (exact written ranges, paged with marker/maxresults), Rename (with
  replace-if-exists), List/Force Close Handles.
* Listings are sorted by upper-cased name; ``prefix`` matches
  case-insensitively, like the rest of the namespace.
* Conditional headers If-Match, If-None-Match, If-Modified-Since and
  If-Unmodified-Since on file reads and writes (412 ConditionNotMet, 304).
  With ``conditional_reads=False`` reads refuse them with 400
  ConditionHeadersNotSupported, as the real service does.
* Errors use the service's XML body and ``x-ms-error-code`` header.

Not supported (501 NotImplemented unless noted): leases, share snapshots,
copy (Start/Abort Copy, Put Range From URL), Create/Get Permission, symbolic
and hard links, share undelete, quota enforcement, ``x-ms-structured-body``
CRC64 payloads (400), and host-style URLs.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import contextlib
import errno
import hashlib
import hmac
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import ssl
import stat
import sys
import tempfile
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from email.utils import formatdate, parsedate_to_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterable, Optional
from urllib.parse import quote, unquote, urlsplit
from xml.sax.saxutils import escape, quoteattr

from tests.support.background import BackgroundServer

ACCOUNT_NAME = "devstoreaccount1"
# The public, well-known development storage key (also used by Azurite).
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="

DEFAULT_API_VERSION = "2025-05-05"
MAX_RANGE_SIZE = 4 * 1024 * 1024
MAX_REQUEST_BODY = MAX_RANGE_SIZE
MAX_DRAINED_BODY = 256 * 1024 * 1024
MAX_LIST_RESULTS = 5000
DEFAULT_SHARE_QUOTA_GIB = 5120
MAX_NAME_LENGTH = 255
MAX_PATH_LENGTH = 2048  # a whole path below the share ("Naming and Referencing Shares, Directories, Files")
# Id the real service reports for every share's root directory.
ROOT_DIRECTORY_ID = "13835128424026341376"
DEFAULT_PERMISSION_KEY = "4066528134148476695*1"
XML_CONTENT_TYPE = "application/xml"
READ_CHUNK = 1024 * 1024

_SHARE_NAME_RE = re.compile(r"^[a-z0-9](?!.*--)[a-z0-9-]{1,61}[a-z0-9]$")
_METADATA_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Characters Azure Files forbids in file and directory names.
_INVALID_NAME_CHARS = re.compile(r'["\\/:|<>*?\x00-\x1f]')
# Characters that cannot appear in an XML 1.0 document; names holding them
# are sent percent-encoded with Encoded="true", as the service does.
_XML_INVALID_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff]")
_SMB_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(?:\.(\d{1,7}))?Z$")
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")

# Azure Files OAuth over REST: file and directory operations from this
# version, share and service ones (Create Share, List Shares...) from the next.
OAUTH_MIN_VERSION = "2022-11-02"
OAUTH_SHARE_MIN_VERSION = "2024-11-04"
FILE_REQUEST_INTENT = "x-ms-file-request-intent"
# What Azurite's --oauth basic accepts, for the file service: issuers of the
# public and national Entra clouds, and storage's audiences.
_VALID_ISSUER_PREFIXES = ("https://sts.windows.net/", "https://sts.microsoftonline.de/",
                          "https://sts.chinacloudapi.cn/", "https://sts.windows-ppe.net")
_STORAGE_AUDIENCES = ("https://storage.azure.com", "https://storage.azure.com/",
                      "e406a681-f3d4-42a8-90b6-c2b029497af1")
_ACCOUNT_AUDIENCE_RE = re.compile(r"^https://([^./]+)\.file\.core\.(?:windows\.net|chinacloudapi\.cn|"
                                  r"usgovcloudapi\.net|cloudapi\.de)/?$")

# SMB attribute names in the order the service reports them.
_ATTRIBUTE_NAMES = [
    "ReadOnly", "Hidden", "System", "None", "Directory", "Archive",
    "Temporary", "Offline", "NotContentIndexed", "NoScrubData",
]
_ATTRIBUTE_LOOKUP = {name.lower(): name for name in _ATTRIBUTE_NAMES}

# Primary collation order the service uses when sorting x-ms- header names
# for the string-to-sign.  It is a culture-aware sort: '-' and "'" have no
# primary weight, punctuation sorts before digits and letters, and '+' sorts
# after the other punctuation.  Plain ordinal sorting disagrees for names
# such as x-ms-meta-a_1 vs x-ms-meta-a1, and the signature would not match.
_HEADER_COLLATION = "!#$%&*.^_`|~+0123456789abcdefghijklmnopqrstuvwxyz"
_HEADER_RANK = {char: rank for rank, char in enumerate(_HEADER_COLLATION)}

_SIGNED_STANDARD_HEADERS = [
    "content-encoding", "content-language", "content-length", "content-md5",
    "content-type", "date", "if-modified-since", "if-match", "if-none-match",
    "if-unmodified-since", "range",
]
_SAS_QUERY_PARAMS = {
    "sv", "ss", "srt", "sp", "se", "st", "sip", "spr", "sig", "sr", "si",
    "rscc", "rscd", "rsce", "rscl", "rsct", "ses", "skoid", "sktid", "skt",
    "ske", "sks", "skv", "sduoid", "skdutid",
}


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


class StorageError(Exception):
    """An error reported to the client in the service's XML error format."""

    def __init__(self, status: int, code: str, message: str,
                 headers: Optional[dict[str, str]] = None, detail: Optional[str] = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.detail = detail
        # Set when the request body was not consumed, so the connection
        # cannot be reused safely.
        self.close_connection = False


def _error(code: str, status: int, message: str, **kwargs) -> StorageError:
    return StorageError(status, code, message, **kwargs)


def share_not_found() -> StorageError:
    return _error("ShareNotFound", 404, "The specified share does not exist.")


def resource_not_found() -> StorageError:
    return _error("ResourceNotFound", 404, "The specified resource does not exist.")


def parent_not_found() -> StorageError:
    return _error("ParentNotFound", 404, "The specified parent path does not exist.")


def resource_exists() -> StorageError:
    return _error("ResourceAlreadyExists", 409, "The specified resource already exists.")


def invalid_header(name: str, value: Optional[str] = None) -> StorageError:
    return _error("InvalidHeaderValue", 400,
                  "The value for one of the HTTP headers is not in the correct format.",
                  detail=f"HeaderName: {name}, HeaderValue: {value}")


def missing_header(name: str) -> StorageError:
    return _error("MissingRequiredHeader", 400,
                  "An HTTP header that's mandatory for this request is not specified.",
                  detail=f"HeaderName: {name}")


def invalid_query(name: str, value: Optional[str] = None) -> StorageError:
    return _error("InvalidQueryParameterValue", 400,
                  "Value for one of the query parameters specified in the request URI is invalid.",
                  detail=f"QueryParameterName: {name}, QueryParameterValue: {value}")


def invalid_name() -> StorageError:
    return _error("InvalidResourceName", 400, "The specifed resource name contains invalid characters.")


def invalid_range(size: int) -> StorageError:
    return _error("InvalidRange", 416, "The range specified is invalid for the current size of the resource.",
                  headers={"Content-Range": f"bytes */{size}"})


def auth_failed(detail: str) -> StorageError:
    return _error("AuthenticationFailed", 403,
                  "Server failed to authenticate the request. Make sure the value of Authorization "
                  "header is formed correctly including the signature.", detail=detail)


def invalid_token(detail: str, tenant: str = "common") -> StorageError:
    # The service answers a token it cannot accept with a challenge naming
    # the authority and the resource to ask a token of.
    challenge = (f"Bearer authorization_uri=https://login.microsoftonline.com/{tenant}/oauth2/authorize "
                 f"resource_id=https://storage.azure.com")
    return _error("InvalidAuthenticationInfo", 401,
                  "Server failed to authenticate the request. Please refer to the information in the "
                  "www-authenticate header.", detail=detail, headers={"WWW-Authenticate": challenge})


def condition_not_met() -> StorageError:
    return _error("ConditionNotMet", 412, "The condition specified using HTTP conditional header(s) is not met.")


def not_implemented(operation: str) -> StorageError:
    return _error("NotImplemented", 501, f"The emulator does not implement this operation: {operation}.")


# --------------------------------------------------------------------------
# Time and value helpers
# --------------------------------------------------------------------------


def http_date(timestamp: float) -> str:
    return formatdate(timestamp, usegmt=True)


def smb_time(timestamp: float) -> str:
    """Format like the service: ISO 8601 with 7 fractional digits (100 ns ticks)."""
    moment = datetime.fromtimestamp(timestamp, timezone.utc)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond:06d}0Z"


def parse_smb_time(header: str, value: str) -> str:
    match = _SMB_TIME_RE.match(value.strip())
    if not match:
        raise invalid_header(header, value)
    try:
        datetime.strptime(match.group(1), "%Y-%m-%dT%H:%M:%S")
    except ValueError:
        raise invalid_header(header, value) from None
    return f"{match.group(1)}.{(match.group(2) or '').ljust(7, '0')}Z"


def parse_http_date(value: str) -> Optional[float]:
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def parse_sas_time(value: str) -> Optional[float]:
    """SAS times are ISO 8601 in UTC, with or without seconds/fractions."""
    text = value.strip().replace("Z", "+00:00")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


class EtagClock:
    """Hands out strictly increasing ETags based on FILETIME ticks.

    Deriving them from the clock (rather than a counter from zero) keeps
    them unique across restarts on the same --location."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> str:
        with self._lock:
            ticks = time.time_ns() // 100 + 116444736000000000
            self._last = max(ticks, self._last + 1)
            return f'"0x{self._last:X}"'


def md5_base64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


def xml_text(value: str) -> str:
    return escape(value)


def xml_name(tag: str, value: str) -> str:
    """A <Name>/<Prefix> element, percent-encoded when XML cannot carry it."""
    if _XML_INVALID_CHARS.search(value):
        return f'<{tag} Encoded="true">{quote(value, safe="")}</{tag}>'
    return f"<{tag}>{escape(value)}</{tag}>"


def encode_marker(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii").rstrip("=")


def decode_marker(marker: str) -> str:
    try:
        padded = marker + "=" * (-len(marker) % 4)
        return base64.urlsafe_b64decode(padded.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        raise invalid_query("marker", marker) from None


def listing_sort_key(name: str) -> tuple[str, str]:
    # Upper-casing approximates the NTFS collation the service lists in.
    return (name.upper(), name)


# --------------------------------------------------------------------------
# Written-range bookkeeping (for List Ranges)
# --------------------------------------------------------------------------


def add_range(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    """Union of ``ranges`` with the inclusive range [start, end], merged."""
    merged: list[list[int]] = []
    for low, high in sorted(ranges + [[start, end]]):
        if merged and low <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], high)
        else:
            merged.append([low, high])
    return merged


def remove_range(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    result = []
    for low, high in ranges:
        if high < start or low > end:
            result.append([low, high])
            continue
        if low < start:
            result.append([low, start - 1])
        if high > end:
            result.append([end + 1, high])
    return result


def truncate_ranges(ranges: list[list[int]], size: int) -> list[list[int]]:
    return [[low, min(high, size - 1)] for low, high in ranges if low < size]


def clip_ranges(ranges: list[list[int]], start: int, end: int) -> list[list[int]]:
    return [[max(low, start), min(high, end)] for low, high in ranges if high >= start and low <= end]


# --------------------------------------------------------------------------
# SMB properties
# --------------------------------------------------------------------------


def normalize_attributes(value: str, is_directory: bool) -> str:
    """Validate an x-ms-file-attributes value and return the service's form."""
    names = set()
    for part in value.split("|"):
        part = part.strip()
        if not part:
            continue
        canonical = _ATTRIBUTE_LOOKUP.get(part.lower())
        if canonical is None:
            raise invalid_header("x-ms-file-attributes", value)
        names.add(canonical)
    names.discard("None")
    if is_directory:
        names.add("Directory")
    elif "Directory" in names:
        raise invalid_header("x-ms-file-attributes", value)
    if not names:
        names.add("Archive")
    return " | ".join(name for name in _ATTRIBUTE_NAMES if name in names)


@dataclass
class SmbChanges:
    """SMB properties requested through x-ms-file-* headers (None = not given)."""

    attributes: Optional[str] = None
    creation_time: Optional[str] = None
    last_write_time: Optional[str] = None
    change_time: Optional[str] = None
    permission: Optional[str] = None
    permission_key: Optional[str] = None

    @classmethod
    def from_headers(cls, headers) -> "SmbChanges":
        return cls(
            attributes=headers.get("x-ms-file-attributes"),
            creation_time=headers.get("x-ms-file-creation-time"),
            last_write_time=headers.get("x-ms-file-last-write-time"),
            change_time=headers.get("x-ms-file-change-time"),
            permission=headers.get("x-ms-file-permission"),
            permission_key=headers.get("x-ms-file-permission-key"),
        )


def _apply_time(meta: dict, key: str, header: str, value: Optional[str], now: str, creating: bool) -> None:
    if value is None or value.lower() == "preserve":
        if creating:
            meta[key] = now
        return
    meta[key] = now if value.lower() == "now" else parse_smb_time(header, value)


def apply_smb_changes(meta: dict, changes: SmbChanges, is_directory: bool, creating: bool) -> None:
    """Apply requested SMB properties; the change time moves on every change."""
    now = smb_time(time.time())
    if changes.attributes is not None and changes.attributes.lower() != "preserve":
        meta["attrs"] = normalize_attributes(changes.attributes, is_directory)
    elif creating:
        meta["attrs"] = "Directory" if is_directory else "Archive"
    _apply_time(meta, "ctime", "x-ms-file-creation-time", changes.creation_time, now, creating)
    _apply_time(meta, "wtime", "x-ms-file-last-write-time", changes.last_write_time, now, creating)
    if changes.change_time is None or changes.change_time.lower() in ("preserve", "now"):
        meta["chtime"] = now
    else:
        meta["chtime"] = parse_smb_time("x-ms-file-change-time", changes.change_time)
    if changes.permission_key:
        meta["perm"] = changes.permission_key
    elif changes.permission and changes.permission.lower() not in ("inherit", "preserve"):
        # A real SDDL: derive a stable key from it, as the service stores
        # each distinct descriptor once per share.
        digest = int.from_bytes(hashlib.sha256(changes.permission.encode("utf-8")).digest()[:8], "big")
        meta["perm"] = f"{digest}*{digest % 10}"
    elif creating:
        meta["perm"] = DEFAULT_PERMISSION_KEY


# --------------------------------------------------------------------------
# Conditional headers
# --------------------------------------------------------------------------


@dataclass
class Conditions:
    if_match: Optional[str] = None
    if_none_match: Optional[str] = None
    if_modified_since: Optional[float] = None
    if_unmodified_since: Optional[float] = None

    @classmethod
    def from_headers(cls, headers) -> "Conditions":
        def date(name: str) -> Optional[float]:
            value = headers.get(name)
            if value is None:
                return None
            parsed = parse_http_date(value)
            if parsed is None:
                raise invalid_header(name, value)
            return parsed

        return cls(headers.get("If-Match"), headers.get("If-None-Match"),
                   date("If-Modified-Since"), date("If-Unmodified-Since"))

    @staticmethod
    def _matches(header: str, etag: str) -> bool:
        candidates = [item.strip() for item in header.split(",")]
        bare = etag.strip('"')
        return "*" in candidates or any(c.removeprefix("W/").strip('"') == bare for c in candidates)

    def check(self, etag: str, last_modified: float, is_read: bool) -> None:
        """Raise 412 (or 304 for reads) when the preconditions fail."""
        # HTTP dates have one-second resolution.
        modified = int(last_modified)
        if self.if_match is not None and not self._matches(self.if_match, etag):
            raise condition_not_met()
        if self.if_unmodified_since is not None and modified > self.if_unmodified_since:
            raise condition_not_met()
        if self.if_none_match is not None and self._matches(self.if_none_match, etag):
            if is_read:
                raise _error("ConditionNotMet", 304, "The condition specified using HTTP conditional "
                             "header(s) is not met.", headers={"ETag": etag})
            raise condition_not_met()
        if is_read and self.if_modified_since is not None and modified <= self.if_modified_since:
            raise _error("ConditionNotMet", 304, "The condition specified using HTTP conditional "
                         "header(s) is not met.", headers={"ETag": etag})


# --------------------------------------------------------------------------
# Storage
# --------------------------------------------------------------------------


@dataclass
class Share:
    name: str
    content_root: str
    meta_path: str
    props: dict
    entries: dict[str, dict]
    lock: threading.RLock = field(default_factory=threading.RLock)
    deleted: bool = False


@dataclass
class Entry:
    """A resolved file or directory: actual (case-preserved) path parts."""

    parts: list[str]
    is_directory: bool

    @property
    def key(self) -> str:
        return "/".join(self.parts)


@dataclass
class FileRead:
    """Everything a download needs, captured under the share lock."""

    fd: int
    size: int
    meta: dict


class FileStore:
    """Shares, directories and files on disk plus their service properties.

    Every mutation happens under the owning share's lock; content reads only
    take the lock to open the file, then use os.pread so parallel ranged
    downloads do not serialize."""

    def __init__(self, location: str):
        self.location = os.path.abspath(location)
        self.shares_dir = os.path.join(self.location, "shares")
        self.meta_dir = os.path.join(self.location, "meta")
        self.service_properties_path = os.path.join(self.location, "service-properties.xml")
        os.makedirs(self.shares_dir, exist_ok=True)
        os.makedirs(self.meta_dir, exist_ok=True)
        self.etags = EtagClock()
        self._lock = threading.Lock()
        self._shares: dict[str, Share] = {}
        self._load_shares()

    # ----- persistence -----------------------------------------------------

    def _load_shares(self) -> None:
        for name in sorted(os.listdir(self.shares_dir)):
            content_root = os.path.join(self.shares_dir, name)
            if not _SHARE_NAME_RE.match(name) or not os.path.isdir(content_root):
                continue
            meta_path = os.path.join(self.meta_dir, name + ".json")
            try:
                with open(meta_path, encoding="utf-8") as handle:
                    saved = json.load(handle)
                props, entries = saved["share"], saved["entries"]
            except (OSError, ValueError, KeyError):
                props, entries = self._new_share_props(None, {}), {}
            share = Share(name, content_root, meta_path, props, entries)
            share.entries.setdefault("", self._new_entry_meta(share, True, SmbChanges(), ROOT_DIRECTORY_ID))
            self._shares[name] = share

    def _save(self, share: Share) -> None:
        temp_path = share.meta_path + ".tmp"
        with open(temp_path, "w", encoding="utf-8") as handle:
            json.dump({"share": share.props, "entries": share.entries}, handle)
        os.replace(temp_path, share.meta_path)

    def _new_share_props(self, quota: Optional[int], metadata: dict) -> dict:
        return {"etag": self.etags.next(), "mtime": time.time(), "next_id": 1,
                "quota": quota or DEFAULT_SHARE_QUOTA_GIB, "meta": metadata, "acl": None}

    def _new_entry_meta(self, share: Share, is_directory: bool, changes: SmbChanges,
                        file_id: Optional[str] = None) -> dict:
        if file_id is None:
            file_id = str((1 << 63) + share.props["next_id"])
            share.props["next_id"] += 1
        meta = {"id": file_id, "etag": self.etags.next(), "mtime": time.time(), "meta": {}}
        apply_smb_changes(meta, changes, is_directory, creating=True)
        if not is_directory:
            meta["http"] = {}
            meta["ranges"] = []
        return meta

    def _touch(self, meta: dict) -> None:
        meta["etag"] = self.etags.next()
        meta["mtime"] = time.time()

    # ----- shares ------------------------------------------------------------

    def _share(self, name: str) -> Share:
        with self._lock:
            share = self._shares.get(name)
        if share is None or share.deleted:
            raise share_not_found()
        return share

    @contextlib.contextmanager
    def locked_share(self, name: str):
        share = self._share(name)
        with share.lock:
            # The share may have been deleted while we waited for its lock.
            if share.deleted:
                raise share_not_found()
            yield share

    def create_share(self, name: str, quota: Optional[int], metadata: dict) -> dict:
        if not _SHARE_NAME_RE.match(name):
            raise _error("InvalidResourceName", 400, "The specifed resource name contains invalid characters.")
        with self._lock:
            if name in self._shares:
                raise _error("ShareAlreadyExists", 409, "The specified share already exists.")
            content_root = os.path.join(self.shares_dir, name)
            os.makedirs(content_root, exist_ok=True)
            share = Share(name, content_root, os.path.join(self.meta_dir, name + ".json"),
                          self._new_share_props(quota, metadata), {})
            share.entries[""] = self._new_entry_meta(share, True, SmbChanges(), ROOT_DIRECTORY_ID)
            self._save(share)
            self._shares[name] = share
            return dict(share.props)

    def delete_share(self, name: str) -> None:
        with self._lock:
            share = self._shares.get(name)
            if share is None:
                raise share_not_found()
            with share.lock:
                share.deleted = True
                del self._shares[name]
                shutil.rmtree(share.content_root, ignore_errors=True)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(share.meta_path)

    def get_share(self, name: str) -> dict:
        with self.locked_share(name) as share:
            return json.loads(json.dumps(share.props))

    def list_shares(self) -> list[tuple[str, dict]]:
        with self._lock:
            shares = sorted(self._shares.items())
        listed = []
        for name, share in shares:
            with share.lock:
                if not share.deleted:
                    listed.append((name, json.loads(json.dumps(share.props))))
        return listed

    def update_share(self, name: str, change: Callable[[dict], None]) -> dict:
        with self.locked_share(name) as share:
            change(share.props)
            share.props["etag"] = self.etags.next()
            share.props["mtime"] = time.time()
            self._save(share)
            return dict(share.props)

    def share_usage(self, name: str) -> int:
        with self.locked_share(name) as share:
            total = 0
            for directory, _, files in os.walk(share.content_root):
                for file_name in files:
                    with contextlib.suppress(OSError):
                        total += os.lstat(os.path.join(directory, file_name)).st_size
            return total

    # ----- path resolution -----------------------------------------------

    def _path(self, share: Share, parts: list[str]) -> str:
        for part in parts:
            if part in ("", ".", "..") or "/" in part or "\x00" in part:
                raise invalid_name()
        path = os.path.join(share.content_root, *parts)
        # Defence in depth: names are validated when the request is parsed.
        if os.path.commonpath([share.content_root, os.path.abspath(path)]) != share.content_root:
            raise invalid_name()
        return path

    @staticmethod
    def _kind(path: str) -> Optional[str]:
        try:
            mode = os.lstat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return None
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISREG(mode):
            return "file"
        return None  # symlinks and devices are not part of the namespace

    def _lookup(self, share: Share, parent_parts: list[str], name: str) -> Optional[tuple[str, str]]:
        """Find ``name`` in a directory case-insensitively: (actual name, kind)."""
        parent = self._path(share, parent_parts)
        kind = self._kind(os.path.join(parent, name))
        if kind is not None:
            return name, kind
        folded = name.casefold()
        try:
            candidates = os.listdir(parent)
        except (FileNotFoundError, NotADirectoryError):
            return None
        for candidate in candidates:
            if candidate.casefold() == folded:
                kind = self._kind(os.path.join(parent, candidate))
                if kind is not None:
                    return candidate, kind
        return None

    def _resolve_parent(self, share: Share, parts: list[str]) -> list[str]:
        """Actual parts of the parent directory of ``parts`` or ParentNotFound."""
        actual: list[str] = []
        for name in parts[:-1]:
            found = self._lookup(share, actual, name)
            if found is None or found[1] != "dir":
                raise parent_not_found()
            actual.append(found[0])
        return actual

    def _resolve(self, share: Share, parts: list[str]) -> tuple[list[str], Optional[Entry]]:
        """(actual parent parts, entry or None if the leaf does not exist)."""
        if not parts:
            return [], Entry([], True)
        parent = self._resolve_parent(share, parts)
        found = self._lookup(share, parent, parts[-1])
        if found is None:
            return parent, None
        return parent, Entry(parent + [found[0]], found[1] == "dir")

    def _existing(self, share: Share, parts: list[str], want_directory: bool) -> Entry:
        _, entry = self._resolve(share, parts)
        if entry is None or entry.is_directory != want_directory:
            raise resource_not_found()
        return entry

    def _meta(self, share: Share, entry: Entry) -> dict:
        meta = share.entries.get(entry.key)
        if meta is None:
            # Content placed under --location by hand: adopt it.
            meta = self._new_entry_meta(share, entry.is_directory, SmbChanges())
            if not entry.is_directory:
                size = os.lstat(self._path(share, entry.parts)).st_size
                meta["ranges"] = [[0, size - 1]] if size else []
            share.entries[entry.key] = meta
        return meta

    def _parent_id(self, share: Share, entry: Entry) -> str:
        if not entry.parts:
            return ""
        return self._meta(share, Entry(entry.parts[:-1], True))["id"]

    def _describe(self, share: Share, entry: Entry) -> dict:
        """Snapshot of an entry's properties for building a response."""
        described = json.loads(json.dumps(self._meta(share, entry)))
        described["parent_id"] = self._parent_id(share, entry)
        if not entry.is_directory:
            described["size"] = os.lstat(self._path(share, entry.parts)).st_size
        return described

    # ----- directories -----------------------------------------------------

    def create_directory(self, share_name: str, parts: list[str], changes: SmbChanges, metadata: dict) -> dict:
        with self.locked_share(share_name) as share:
            if not parts:
                raise resource_exists()
            parent, entry = self._resolve(share, parts)
            if entry is not None:
                raise resource_exists()
            entry = Entry(parent + [parts[-1]], True)
            meta = self._new_entry_meta(share, True, changes)  # validates headers before touching disk
            os.mkdir(self._path(share, entry.parts))
            meta["meta"] = metadata
            share.entries[entry.key] = meta
            self._save(share)
            return self._describe(share, entry)

    def get_directory(self, share_name: str, parts: list[str]) -> dict:
        with self.locked_share(share_name) as share:
            return self._describe(share, self._existing(share, parts, True))

    def delete_directory(self, share_name: str, parts: list[str]) -> None:
        with self.locked_share(share_name) as share:
            if not parts:
                raise _error("InvalidResourceName", 400, "The root directory of a share cannot be deleted.")
            entry = self._existing(share, parts, True)
            path = self._path(share, entry.parts)
            if os.listdir(path):
                raise _error("DirectoryNotEmpty", 409, "The specified directory is not empty.")
            os.rmdir(path)
            share.entries.pop(entry.key, None)
            self._save(share)

    def update_entry(self, share_name: str, parts: list[str], is_directory: bool,
                     change: Callable[[Share, Entry, dict], None],
                     conditions: Optional[Conditions] = None) -> dict:
        """Run ``change`` on an entry's properties under the lock, then persist."""
        with self.locked_share(share_name) as share:
            entry = self._existing(share, parts, is_directory)
            meta = self._meta(share, entry)
            if conditions is not None:
                conditions.check(meta["etag"], meta["mtime"], is_read=False)
            change(share, entry, meta)
            self._touch(meta)
            self._save(share)
            return self._describe(share, entry)

    def list_directory(self, share_name: str, parts: list[str]) -> tuple[dict, list[tuple[str, bool, dict]]]:
        """Directory properties and its children as (name, is_directory, props)."""
        with self.locked_share(share_name) as share:
            directory = self._existing(share, parts, True)
            children = []
            with os.scandir(self._path(share, directory.parts)) as scan:
                for item in scan:
                    kind = self._kind(item.path)
                    if kind is None:
                        continue
                    child = Entry(directory.parts + [item.name], kind == "dir")
                    children.append((item.name, child.is_directory, self._describe(share, child)))
            children.sort(key=lambda child: listing_sort_key(child[0]))
            return self._describe(share, directory), children

    # ----- files -------------------------------------------------------------

    def create_file(self, share_name: str, parts: list[str], size: int, changes: SmbChanges,
                    metadata: dict, http_headers: dict, conditions: Conditions) -> dict:
        with self.locked_share(share_name) as share:
            if not parts:
                raise invalid_name()
            parent, entry = self._resolve(share, parts)
            if entry is not None and entry.is_directory:
                raise _error("ResourceTypeMismatch", 409,
                             "The specified resource type does not match the type of the resource in the path.")
            if entry is not None:
                # Create replaces an existing file but keeps its identity.
                old = self._meta(share, entry)
                conditions.check(old["etag"], old["mtime"], is_read=False)
                meta = self._new_entry_meta(share, False, changes, old["id"])
            else:
                entry = Entry(parent + [parts[-1]], False)
                meta = self._new_entry_meta(share, False, changes)  # validates headers before touching disk
            with open(self._path(share, entry.parts), "wb") as handle:
                handle.truncate(size)
            meta["meta"] = metadata
            meta["http"] = http_headers
            share.entries[entry.key] = meta
            self._save(share)
            return self._describe(share, entry)

    def get_file(self, share_name: str, parts: list[str]) -> dict:
        with self.locked_share(share_name) as share:
            return self._describe(share, self._existing(share, parts, False))

    def open_file(self, share_name: str, parts: list[str]) -> FileRead:
        """Open a file for reading; the caller closes ``fd``.

        The descriptor stays valid even if the file is renamed or deleted
        meanwhile, so the read itself needs no lock."""
        with self.locked_share(share_name) as share:
            entry = self._existing(share, parts, False)
            described = self._describe(share, entry)
            fd = os.open(self._path(share, entry.parts), os.O_RDONLY)
            return FileRead(fd, os.fstat(fd).st_size, described)

    def delete_file(self, share_name: str, parts: list[str], conditions: Conditions) -> None:
        with self.locked_share(share_name) as share:
            entry = self._existing(share, parts, False)
            meta = self._meta(share, entry)
            conditions.check(meta["etag"], meta["mtime"], is_read=False)
            os.remove(self._path(share, entry.parts))
            share.entries.pop(entry.key, None)
            self._save(share)

    def write_range(self, share_name: str, parts: list[str], start: int, end: int,
                    data: Optional[bytes], touch_write_time: bool, conditions: Conditions) -> dict:
        """Write ``data`` at [start, end], or zero the range when data is None."""
        def change(share: Share, entry: Entry, meta: dict) -> None:
            path = self._path(share, entry.parts)
            size = os.lstat(path).st_size
            if end >= size:
                raise invalid_range(size)
            fd = os.open(path, os.O_WRONLY)
            try:
                if data is None:
                    _write_zeros(fd, start, end - start + 1)
                else:
                    os.pwrite(fd, data, start)
            finally:
                os.close(fd)
            if data is None:
                meta["ranges"] = remove_range(meta.get("ranges", []), start, end)
            else:
                meta["ranges"] = add_range(meta.get("ranges", []), start, end)
            now = smb_time(time.time())
            meta["chtime"] = now
            if touch_write_time:
                meta["wtime"] = now

        return self.update_entry(share_name, parts, False, change, conditions)

    def resize_file(self, share: Share, entry: Entry, meta: dict, size: int) -> None:
        with open(self._path(share, entry.parts), "r+b") as handle:
            handle.truncate(size)
        meta["ranges"] = truncate_ranges(meta.get("ranges", []), size)

    def file_ranges(self, share_name: str, parts: list[str]) -> tuple[dict, list[list[int]]]:
        with self.locked_share(share_name) as share:
            entry = self._existing(share, parts, False)
            described = self._describe(share, entry)
            return described, truncate_ranges(described.get("ranges", []), described["size"])

    # ----- rename --------------------------------------------------------------

    def rename(self, share_name: str, source_parts: list[str], target_parts: list[str], is_directory: bool,
               replace: bool, changes: SmbChanges, metadata: Optional[dict]) -> dict:
        with self.locked_share(share_name) as share:
            if not source_parts or not target_parts:
                raise invalid_name()
            source = self._existing(share, source_parts, is_directory)
            target_parent, existing = self._resolve(share, target_parts)
            target = Entry(target_parent + [target_parts[-1]], is_directory)
            if is_directory and _is_within(target.parts, source.parts):
                raise _error("InvalidInput", 400, "A directory cannot be moved into itself.")
            # Validate the SMB headers on a scratch dict before anything moves.
            apply_smb_changes({}, changes, is_directory, creating=False)
            same_entry = existing is not None and existing.key == source.key
            if existing is not None and not same_entry:
                if existing.is_directory or not replace:
                    raise resource_exists()
                # Remove it explicitly: it may differ from the new name in case only.
                os.remove(self._path(share, existing.parts))
                share.entries.pop(existing.key, None)
            os.replace(self._path(share, source.parts), self._path(share, target.parts))
            self._rekey(share, source.key, target.key)
            meta = self._meta(share, target)
            apply_smb_changes(meta, changes, is_directory, creating=False)
            if metadata is not None:
                meta["meta"] = metadata
            self._touch(meta)
            self._save(share)
            return self._describe(share, target)

    @staticmethod
    def _rekey(share: Share, old_key: str, new_key: str) -> None:
        """Move the properties of an entry and everything below it."""
        moved = {}
        for key in list(share.entries):
            if key == old_key or key.startswith(old_key + "/"):
                moved[new_key + key[len(old_key):]] = share.entries.pop(key)
        share.entries.update(moved)

    # ----- service properties ------------------------------------------------

    def get_service_properties(self) -> Optional[bytes]:
        try:
            with open(self.service_properties_path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            return None

    def set_service_properties(self, body: bytes) -> None:
        with self._lock:
            with open(self.service_properties_path, "wb") as handle:
                handle.write(body)


def _is_within(parts: list[str], ancestor: list[str]) -> bool:
    folded = [part.casefold() for part in parts]
    return len(parts) > len(ancestor) and folded[:len(ancestor)] == [p.casefold() for p in ancestor]


def _write_zeros(fd: int, offset: int, length: int) -> None:
    block = bytes(min(length, READ_CHUNK))
    while length > 0:
        count = min(length, len(block))
        os.pwrite(fd, block[:count], offset)
        offset += count
        length -= count


# --------------------------------------------------------------------------
# Requests and responses
# --------------------------------------------------------------------------


@dataclass
class Request:
    method: str
    raw_path: str
    raw_query: str
    query_pairs: list[tuple[str, str]]   # decoded, names as sent
    query: dict[str, str]                # lower-cased names, last value wins
    headers: object                      # http.client.HTTPMessage
    body: bytes
    client_ip: str
    host: str
    secure: bool = False                 # came over TLS
    share: Optional[str] = None
    parts: list[str] = field(default_factory=list)
    signed_path: str = ""                # decoded path below the account, for service SAS
    sas: Optional[dict] = None           # verified SAS parameters, if SAS was used
    token_claims: Optional[dict] = None  # claims of the accepted bearer token, if one was used

    @property
    def restype(self) -> Optional[str]:
        return self.query.get("restype")

    @property
    def comp(self) -> Optional[str]:
        return self.query.get("comp")

    def header(self, name: str, default: Optional[str] = None) -> Optional[str]:
        value = self.headers.get(name)
        return default if value is None else value.strip()


@dataclass
class Response:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    # (fd, offset, length) of file content to stream instead of ``body``.
    stream: Optional[tuple[int, int, int]] = None
    # Content-Length to advertise on HEAD, where no body is sent.
    head_length: Optional[int] = None


def xml_response(status: int, document: str, headers: Optional[dict[str, str]] = None) -> Response:
    body = ('<?xml version="1.0" encoding="utf-8"?>' + document).encode("utf-8")
    merged = {"Content-Type": XML_CONTENT_TYPE}
    merged.update(headers or {})
    return Response(status, merged, body)


def error_response(error: StorageError, request_id: str) -> Response:
    message = f"{error.message}\nRequestId:{request_id}\nTime:{smb_time(time.time())}"
    detail = ""
    if error.detail:
        tag = ("AuthenticationErrorDetail" if error.code in ("AuthenticationFailed", "InvalidAuthenticationInfo")
               else "ExceptionDetails")
        detail = f"<{tag}>{xml_text(error.detail)}</{tag}>"
    document = f"<Error><Code>{error.code}</Code><Message>{xml_text(message)}</Message>{detail}</Error>"
    response = xml_response(error.status, document, dict(error.headers))
    response.headers["x-ms-error-code"] = error.code
    if error.status == 304:
        response.body = b""
        response.headers.pop("Content-Type", None)
    return response


def parse_query(raw_query: str) -> list[tuple[str, str]]:
    pairs = []
    for item in raw_query.split("&"):
        if not item:
            continue
        name, _, value = item.partition("=")
        try:
            pairs.append((unquote(name, errors="strict"), unquote(value, errors="strict")))
        except UnicodeDecodeError:
            raise invalid_query(name) from None
    return pairs


def split_target(raw_path: str, account: str, allow_trailing_dot: bool) -> tuple[Optional[str], list[str], str]:
    """(share, validated name parts, decoded path below the account) of a URL path."""
    try:
        decoded = unquote(raw_path, errors="strict")
    except UnicodeDecodeError:
        raise _error("InvalidUri", 400, "The requested URI does not represent any resource on the server.") from None
    segments = decoded.split("/")
    if len(segments) < 2 or segments[1] != account:
        raise _error("InvalidUri", 400, "The requested URI does not represent any resource on the server.",
                     detail=f"Only path-style URLs for account {account} are served.")
    # The SDK percent-encodes '/' inside rename targets, so decode first and
    # split afterwards; Azure names can never contain '/'.
    names = [segment for segment in segments[2:] if segment != ""]
    if not names:
        return None, [], ""
    parts = [validate_name(name, allow_trailing_dot) for name in names[1:]]
    if len("/".join(parts)) > MAX_PATH_LENGTH:
        raise invalid_name()
    return names[0], parts, "/".join(names)


def parse_target(request: Request, account: str) -> None:
    allow_trailing_dot = (request.header("x-ms-allow-trailing-dot") or "").lower() == "true"
    request.share, request.parts, request.signed_path = split_target(request.raw_path, account, allow_trailing_dot)


def validate_name(name: str, allow_trailing_dot: bool) -> str:
    if name in (".", "..") or len(name) > MAX_NAME_LENGTH or _INVALID_NAME_CHARS.search(name):
        raise invalid_name()
    if not allow_trailing_dot:
        # The service silently drops trailing dots, as Windows does.
        name = name.rstrip(".")
    if not name:
        raise invalid_name()
    return name


def parse_metadata(request: Request) -> dict[str, str]:
    metadata: dict[str, str] = {}
    for name, value in request.headers.items():
        if name.lower().startswith("x-ms-meta-"):
            key = name[len("x-ms-meta-"):]
            if not _METADATA_NAME_RE.match(key):
                raise _error("InvalidMetadata", 400, "The metadata specified is invalid. "
                             "It has characters that are not permitted.")
            metadata[key] = value.strip()
    return metadata


def metadata_headers(metadata: dict[str, str]) -> dict[str, str]:
    return {f"x-ms-meta-{name}": value for name, value in metadata.items()}


def parse_int_header(request: Request, name: str, required: bool = False) -> Optional[int]:
    value = request.header(name)
    if value is None:
        if required:
            raise missing_header(name)
        return None
    if not value.isdigit():
        raise invalid_header(name, value)
    return int(value)


def parse_byte_range(request: Request, for_write: bool) -> Optional[tuple[int, Optional[int]]]:
    """(start, end or None) from x-ms-range (preferred) or Range."""
    for name in ("x-ms-range", "Range"):
        value = request.header(name)
        if value is None:
            continue
        match = _RANGE_RE.match(value)
        if not match:
            if name == "Range" and not for_write:
                return None  # HTTP says to ignore a Range header we do not understand
            raise invalid_header(name, value)
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) else None
        if end is not None and end < start:
            raise invalid_header(name, value)
        return start, end
    return None


def parse_bool_header(request: Request, name: str) -> bool:
    value = request.header(name)
    if value is None:
        return False
    if value.lower() not in ("true", "false"):
        raise invalid_header(name, value)
    return value.lower() == "true"


def decode_md5_header(request: Request, name: str) -> Optional[str]:
    value = request.header(name)
    if value is None:
        return None
    try:
        if len(base64.b64decode(value, validate=True)) != 16:
            raise ValueError
    except (binascii.Error, ValueError):
        raise invalid_header(name, value) from None
    return value


# --------------------------------------------------------------------------
# Authentication
# --------------------------------------------------------------------------


def header_sort_key(name: str) -> tuple:
    primary = tuple(_HEADER_RANK.get(char, 100 + ord(char)) for char in name if char not in "-'")
    return (primary, name)


def canonicalized_headers(headers) -> str:
    grouped: dict[str, list[str]] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered.startswith("x-ms-"):
            grouped.setdefault(lowered, []).append(value.strip())
    return "".join(f"{name}:{','.join(grouped[name])}\n" for name in sorted(grouped, key=header_sort_key))


def canonicalized_query(pairs: list[tuple[str, str]]) -> str:
    grouped: dict[str, list[str]] = {}
    for name, value in pairs:
        grouped.setdefault(name.lower(), []).append(value)
    return "".join(f"\n{name}:{','.join(sorted(grouped[name]))}" for name in sorted(grouped))


def shared_key_strings_to_sign(request: Request, account: str) -> list[str]:
    """The string(s) a SharedKey client may have signed for this request."""
    lines = [request.method]
    for name in _SIGNED_STANDARD_HEADERS:
        value = request.header(name, "")
        if name == "content-length" and value == "0":
            value = ""  # versions 2015-02-21+ sign an empty Content-Length for 0
        lines.append(value)
    prefix = "\n".join(lines) + "\n" + canonicalized_headers(request.headers)
    query = canonicalized_query(request.query_pairs)
    # Path-style URLs carry the account in the path, and clients sign that
    # path as-is behind "/<account>"; accept the host-style form as well.
    resources = [f"/{account}{request.raw_path}"]
    account_prefix = f"/{account}"
    if request.raw_path.startswith(account_prefix + "/") or request.raw_path == account_prefix:
        resources.append(f"/{account}{request.raw_path[len(account_prefix):] or '/'}")
    return [prefix + resource + query for resource in resources]


def sign(key: bytes, string_to_sign: str) -> str:
    digest = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).digest()
    return base64.b64encode(digest).decode("ascii")


@dataclass
class Operation:
    """A routed operation plus what a SAS needs to grant it."""

    handler: Callable[["Emulator", Request], Response]
    resource_type: str            # account SAS srt letter: s, c or o
    permissions: str              # any one of these SAS permission letters suffices
    level: str                    # service, share, directory or file


class Authenticator:
    def __init__(self, account: str, key: str):
        self.account = account
        self.key = base64.b64decode(key)
        self.bearer_accepted = 0  # requests let in on a bearer token
        self._count_lock = threading.Lock()

    def authenticate(self, request: Request, operation: Optional[Operation]) -> None:
        authorization = request.header("Authorization")
        if authorization and authorization.partition(" ")[0] == "Bearer":
            self._check_bearer(request, operation, authorization.partition(" ")[2].strip())
        elif authorization:
            self._check_shared_key(request, authorization)
        elif any(name.lower() == "sig" for name, _ in request.query_pairs):
            self._check_sas(request, operation)
        else:
            raise _error("NoAuthenticationInformation", 401,
                         "Server failed to authenticate the request. Please refer to the information "
                         "in the www-authenticate header.")

    # ----- SharedKey ---------------------------------------------------------

    def _check_shared_key(self, request: Request, authorization: str) -> None:
        scheme, _, credentials = authorization.partition(" ")
        if scheme != "SharedKey":
            raise auth_failed(f"Unsupported authorization scheme '{scheme}'; only SharedKey, Bearer and SAS "
                              "are emulated.")
        account, _, signature = credentials.strip().partition(":")
        if account != self.account:
            raise auth_failed(f"The account {account} does not exist in the emulator.")
        if not request.header("x-ms-date") and not request.header("Date"):
            raise auth_failed("Request date header not specified.")
        candidates = shared_key_strings_to_sign(request, self.account)
        if not any(hmac.compare_digest(sign(self.key, text), signature) for text in candidates):
            shown = candidates[0].replace("\n", "\\n")
            raise auth_failed(f"The MAC signature found in the HTTP request '{signature}' is not the same as "
                              f"any computed signature. Server used following string to sign: '{shown}'.")

    # ----- Bearer (Azure Files OAuth over REST) ------------------------------

    def _check_bearer(self, request: Request, operation: Optional[Operation], token: str) -> None:
        if not request.secure:
            raise auth_failed("Authentication scheme Bearer is not allowed with HTTP.")
        version = request.header("x-ms-version") or ""
        if version < OAUTH_MIN_VERSION:
            raise auth_failed("Authentication scheme Bearer is not supported in this version.")
        claims = self._token_claims(token)
        intent = request.header(FILE_REQUEST_INTENT)
        if intent is None:
            raise missing_header(FILE_REQUEST_INTENT)
        if intent.lower() != "backup":
            raise invalid_header(FILE_REQUEST_INTENT, intent)
        if operation is not None and operation.level in ("service", "share") and version < OAUTH_SHARE_MIN_VERSION:
            raise _error("FileOAuthManagementApiRestrictedToSrp", 409,
                         "This API does not support bearer tokens. For OAuth, use the Storage Resource "
                         "Provider APIs instead. Learn more: https://aka.ms/azurefiles/restapi.")
        request.token_claims = claims
        with self._count_lock:
            self.bearer_accepted += 1

    def _token_claims(self, token: str) -> dict:
        """The claims of an acceptable token; InvalidAuthenticationInfo otherwise."""
        parts = token.split(".")
        try:
            if len(parts) != 3:
                raise ValueError("not three parts")
            claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
            if not isinstance(claims, dict):
                raise ValueError("claims are not an object")
        except (ValueError, binascii.Error):
            raise invalid_token("The token is malformed.") from None
        tenant = str(claims.get("tid") or "common")
        times = [claims.get(name) for name in ("iat", "nbf", "exp")]
        if not all(isinstance(value, (int, float)) and not isinstance(value, bool) for value in times):
            raise invalid_token("The token lacks the iat, nbf or exp claim.", tenant)
        now = time.time()
        if now < claims["nbf"]:
            raise invalid_token("Lifetime validation failed. The token is not yet valid.", tenant)
        if now > claims["exp"]:
            raise invalid_token("Lifetime validation failed. The token is expired.", tenant)
        issuer = claims.get("iss")
        if not isinstance(issuer, str) or not issuer.startswith(_VALID_ISSUER_PREFIXES):
            raise invalid_token("Issuer validation failed. Issuer did not match.", tenant)
        audience = claims.get("aud")
        account_audience = _ACCOUNT_AUDIENCE_RE.match(audience) if isinstance(audience, str) else None
        if not (audience in _STORAGE_AUDIENCES or (account_audience and account_audience.group(1) == self.account)):
            raise invalid_token("Audience validation failed. Audience did not match.", tenant)
        return claims

    # ----- SAS ------------------------------------------------------------------

    def _check_sas(self, request: Request, operation: Optional[Operation]) -> None:
        params = {name: value for name, value in request.query_pairs if name in _SAS_QUERY_PARAMS}
        if "sr" in params:
            string_to_sign, resource_type = self._service_sas_string(request, params, operation)
        else:
            string_to_sign, resource_type = self._account_sas_string(params, operation)
        if not hmac.compare_digest(sign(self.key, string_to_sign), params.get("sig", "")):
            shown = string_to_sign.replace("\n", "\\n")
            raise auth_failed(f"Signature did not match. String to sign used was {shown}")
        self._check_sas_validity(request, params)
        if operation is not None:
            if resource_type is not None and resource_type not in params.get("srt", ""):
                raise _error("AuthorizationResourceTypeMismatch", 403, "This request is not authorized to "
                             "perform this operation using this resource type.")
            if not set(operation.permissions) & set(params.get("sp", "")):
                raise _error("AuthorizationPermissionMismatch", 403, "This request is not authorized to "
                             "perform this operation using this permission.")
        request.sas = params

    def _account_sas_string(self, params: dict, operation: Optional[Operation]) -> tuple[str, Optional[str]]:
        if "f" not in params.get("ss", ""):
            raise _error("AuthorizationServiceMismatch", 403, "This request is not authorized to perform "
                         "this operation using this service.")
        fields = [self.account] + [params.get(name, "") for name in ("sp", "ss", "srt", "st", "se", "sip", "spr", "sv")]
        # Version 2020-12-06 added the (for files always empty) encryption scope.
        if params.get("sv", "") >= "2020-12-06":
            fields.append(params.get("ses", ""))
        return "\n".join(fields) + "\n", operation.resource_type if operation else None

    def _service_sas_string(self, request: Request, params: dict,
                            operation: Optional[Operation]) -> tuple[str, None]:
        if "si" in params or "skoid" in params:
            raise auth_failed("Stored access policies and user delegation SAS are not supported by the emulator.")
        resource = params["sr"]
        if resource not in ("s", "f"):
            raise auth_failed(f"Unsupported signed resource '{resource}'.")
        signed_path = request.signed_path
        if resource == "s":
            signed_path = request.share or ""
            if operation is not None and operation.level not in ("directory", "file"):
                raise _error("AuthorizationResourceTypeMismatch", 403, "This request is not authorized to "
                             "perform this operation using this resource type.")
        elif operation is not None and operation.level != "file":
            raise _error("AuthorizationResourceTypeMismatch", 403, "This request is not authorized to "
                         "perform this operation using this resource type.")
        canonical_resource = f"/file/{self.account}/{signed_path}"
        fields = [params.get("sp", ""), params.get("st", ""), params.get("se", ""), canonical_resource,
                  params.get("si", ""), params.get("sip", ""), params.get("spr", ""), params.get("sv", ""),
                  params.get("rscc", ""), params.get("rscd", ""), params.get("rsce", ""),
                  params.get("rscl", ""), params.get("rsct", "")]
        return "\n".join(fields), None

    @staticmethod
    def _check_sas_validity(request: Request, params: dict) -> None:
        now = time.time()
        expiry = parse_sas_time(params.get("se", ""))
        if expiry is None or now > expiry:
            raise auth_failed("Signed expiry time must be after the current time.")
        if params.get("st"):
            start = parse_sas_time(params["st"])
            if start is None or now < start:
                raise auth_failed("Signed start time must be before the current time.")
        scheme = "https" if request.secure else "http"
        if params.get("spr") and scheme not in [p.strip() for p in params["spr"].split(",")]:
            raise _error("AuthorizationProtocolMismatch", 403, "This request is not authorized to perform "
                         "this operation using this protocol.")
        if params.get("sip") and not _ip_allowed(request.client_ip, params["sip"]):
            raise _error("AuthorizationSourceIPMismatch", 403, "This request is not authorized to perform "
                         "this operation using this source IP.")


def _ip_allowed(client_ip: str, allowed: str) -> bool:
    try:
        address = ipaddress.ip_address(client_ip)
        low, _, high = allowed.partition("-")
        return ipaddress.ip_address(low) <= address <= ipaddress.ip_address(high or low)
    except ValueError:
        return False


# --------------------------------------------------------------------------
# Operations
# --------------------------------------------------------------------------


def smb_headers(meta: dict) -> dict[str, str]:
    headers = {
        "x-ms-file-permission-key": meta["perm"],
        "x-ms-file-attributes": meta["attrs"],
        "x-ms-file-creation-time": meta["ctime"],
        "x-ms-file-last-write-time": meta["wtime"],
        "x-ms-file-change-time": meta["chtime"],
        "x-ms-file-id": meta["id"],
    }
    if meta.get("parent_id"):
        headers["x-ms-file-parent-id"] = meta["parent_id"]
    return headers


def entity_headers(meta: dict) -> dict[str, str]:
    return {"ETag": meta["etag"], "Last-Modified": http_date(meta["mtime"])}


_CONTENT_HEADERS = [
    # (stored key, request header on create/set, response header)
    ("content_type", "x-ms-content-type", "Content-Type"),
    ("content_encoding", "x-ms-content-encoding", "Content-Encoding"),
    ("content_language", "x-ms-content-language", "Content-Language"),
    ("cache_control", "x-ms-cache-control", "Cache-Control"),
    ("content_disposition", "x-ms-content-disposition", "Content-Disposition"),
]
# SAS query parameters that override response headers on reads.
_SAS_OVERRIDES = {"rsct": "Content-Type", "rsce": "Content-Encoding", "rscl": "Content-Language",
                  "rscc": "Cache-Control", "rscd": "Content-Disposition"}


def parse_content_headers(request: Request) -> dict[str, str]:
    stored = {}
    for key, header, _ in _CONTENT_HEADERS:
        value = request.header(header)
        if value is not None:
            stored[key] = value
    md5 = decode_md5_header(request, "x-ms-content-md5")
    if md5 is not None:
        stored["content_md5"] = md5
    return stored


def file_headers(meta: dict, request: Request) -> dict[str, str]:
    """Headers describing a file, shared by Get File and Get File Properties."""
    http_props = meta.get("http", {})
    headers = {"x-ms-type": "File", "Content-Type": http_props.get("content_type") or "application/octet-stream"}
    for key, _, response_header in _CONTENT_HEADERS[1:]:
        if http_props.get(key):
            headers[response_header] = http_props[key]
    for parameter, response_header in _SAS_OVERRIDES.items():
        if request.sas and request.sas.get(parameter):
            headers[response_header] = request.sas[parameter]
    headers.update(entity_headers(meta))
    headers.update(metadata_headers(meta.get("meta", {})))
    headers.update(smb_headers(meta))
    headers.update({"x-ms-server-encrypted": "true", "x-ms-lease-state": "available",
                    "x-ms-lease-status": "unlocked"})
    return headers


class Emulator:
    """Routes parsed requests to operations on a FileStore."""

    def __init__(self, store: FileStore, account: str = ACCOUNT_NAME, key: str = ACCOUNT_KEY,
                 page_limit: int = MAX_LIST_RESULTS, conditional_reads: bool = True):
        self.store = store
        self.account = account
        # The real service refuses conditional headers on file reads (400
        # ConditionHeadersNotSupported); False emulates that.
        self.conditional_reads = conditional_reads
        # The service may end a listing page early, before maxresults, with a
        # NextMarker; a small limit makes clients follow markers in any test.
        self.page_limit = page_limit
        self.authenticator = Authenticator(account, key)

    # ----- routing ---------------------------------------------------------

    def route(self, request: Request) -> Operation:
        method = "GET" if request.method == "HEAD" else request.method
        comp, restype = request.comp, request.restype
        if request.share is None:
            table, level = _SERVICE_OPERATIONS, "service"
            if restype not in (None, "service"):
                raise invalid_query("restype", restype)
        elif restype == "share":
            table, level = _SHARE_OPERATIONS, "share"
            if request.parts:
                raise invalid_query("restype", restype)
        elif restype == "directory":
            table, level = _DIRECTORY_OPERATIONS, "directory"
        elif restype is not None:
            raise invalid_query("restype", restype)
        elif not request.parts:
            raise _error("InvalidUri", 400, "The requested URI does not represent any resource on the server.")
        else:
            table, level = _FILE_OPERATIONS, "file"
        entry = table.get((request.method, comp)) or table.get((method, comp))
        if entry is None:
            if any(key_comp == comp for _, key_comp in table):
                raise _error("UnsupportedHttpVerb", 405,
                             "The resource doesn't support specified Http Verb.")
            if comp in _UNSUPPORTED_COMPS:
                raise not_implemented(f"comp={comp}")
            raise invalid_query("comp", comp)
        handler, resource_type, permissions = entry
        return Operation(handler, resource_type, permissions, level)

    def handle(self, request: Request) -> Response:
        route_error: Optional[StorageError] = None
        operation: Optional[Operation] = None
        try:
            operation = self.route(request)
        except StorageError as error:
            route_error = error
        # Authenticate before reporting routing problems, like the service.
        self.authenticator.authenticate(request, operation)
        if route_error is not None:
            raise route_error
        if request.header("x-ms-structured-body") is not None:
            raise invalid_header("x-ms-structured-body", "structured message payloads are not emulated")
        # Refuse rather than silently serve live data or create an empty file.
        if "sharesnapshot" in request.query:
            raise not_implemented("share snapshots")
        if request.header("x-ms-copy-source") is not None:
            raise not_implemented("copy")
        return operation.handler(self, request)

    # ----- service ---------------------------------------------------------

    def list_shares(self, request: Request) -> Response:
        prefix = request.query.get("prefix", "")
        marker = request.query.get("marker", "")
        max_results = _max_results(request)
        include = {item.strip().lower() for item in request.query.get("include", "").split(",") if item.strip()}
        shares = [(name, props) for name, props in self.store.list_shares()
                  if name.startswith(prefix) and name >= marker]
        page, rest = shares[:max_results], shares[max_results:]
        items = []
        for name, props in page:
            metadata = ""
            if "metadata" in include:
                metadata = "<Metadata>" + "".join(
                    f"<{key}>{xml_text(value)}</{key}>" for key, value in props["meta"].items()) + "</Metadata>"
            items.append(
                f"<Share><Name>{xml_text(name)}</Name><Properties>"
                f"<Last-Modified>{http_date(props['mtime'])}</Last-Modified><Etag>{xml_text(props['etag'])}</Etag>"
                f"<Quota>{props['quota']}</Quota><AccessTier>TransactionOptimized</AccessTier>"
                f"<LeaseStatus>unlocked</LeaseStatus><LeaseState>available</LeaseState>"
                f"<EnabledProtocols>SMB</EnabledProtocols></Properties>{metadata}</Share>")
        document = (
            f"<EnumerationResults ServiceEndpoint={quoteattr(self._service_endpoint(request))}>"
            f"<Prefix>{xml_text(prefix)}</Prefix>"
            + (f"<Marker>{xml_text(marker)}</Marker>" if marker else "")
            + (f"<MaxResults>{max_results}</MaxResults>" if "maxresults" in request.query else "")
            + f"<Shares>{''.join(items)}</Shares>"
            f"<NextMarker>{xml_text(rest[0][0]) if rest else ''}</NextMarker></EnumerationResults>")
        return xml_response(200, document)

    def get_service_properties(self, request: Request) -> Response:
        stored = self.store.get_service_properties()
        if stored is not None:
            return Response(200, {"Content-Type": XML_CONTENT_TYPE}, stored)
        metrics = ("<Version>1.0</Version><Enabled>false</Enabled>"
                   "<RetentionPolicy><Enabled>false</Enabled></RetentionPolicy>")
        return xml_response(200, f"<StorageServiceProperties><HourMetrics>{metrics}</HourMetrics>"
                                 f"<MinuteMetrics>{metrics}</MinuteMetrics><Cors /></StorageServiceProperties>")

    def set_service_properties(self, request: Request) -> Response:
        self.store.set_service_properties(request.body)
        return Response(202)

    def _service_endpoint(self, request: Request) -> str:
        return f"http://{request.host}/{self.account}/"

    # ----- shares ------------------------------------------------------------

    def create_share(self, request: Request) -> Response:
        props = self.store.create_share(request.share, parse_int_header(request, "x-ms-share-quota"),
                                        parse_metadata(request))
        return Response(201, entity_headers(props))

    def get_share_properties(self, request: Request) -> Response:
        props = self.store.get_share(request.share)
        headers = entity_headers(props)
        headers.update(metadata_headers(props["meta"]))
        headers.update({"x-ms-share-quota": str(props["quota"]), "x-ms-access-tier": "TransactionOptimized",
                        "x-ms-enabled-protocols": "SMB", "x-ms-lease-state": "available",
                        "x-ms-lease-status": "unlocked"})
        return Response(200, headers)

    def delete_share(self, request: Request) -> Response:
        self.store.delete_share(request.share)
        return Response(202)

    def set_share_metadata(self, request: Request) -> Response:
        metadata = parse_metadata(request)
        return Response(200, entity_headers(self.store.update_share(
            request.share, _replace_share_key("meta", metadata))))

    def set_share_properties(self, request: Request) -> Response:
        quota = parse_int_header(request, "x-ms-share-quota")

        def change(props: dict) -> None:
            if quota is not None:
                props["quota"] = quota

        return Response(200, entity_headers(self.store.update_share(request.share, change)))

    def get_share_stats(self, request: Request) -> Response:
        props = self.store.get_share(request.share)
        usage = self.store.share_usage(request.share)
        return xml_response(200, f"<ShareStats><ShareUsageBytes>{usage}</ShareUsageBytes></ShareStats>",
                            entity_headers(props))

    def get_share_acl(self, request: Request) -> Response:
        props = self.store.get_share(request.share)
        document = props.get("acl") or '<?xml version="1.0" encoding="utf-8"?><SignedIdentifiers />'
        return Response(200, {"Content-Type": XML_CONTENT_TYPE, **entity_headers(props)}, document.encode("utf-8"))

    def set_share_acl(self, request: Request) -> Response:
        document = request.body.decode("utf-8", errors="replace")
        return Response(200, entity_headers(self.store.update_share(
            request.share, _replace_share_key("acl", document or None))))

    # ----- directories -------------------------------------------------------

    def create_directory(self, request: Request) -> Response:
        meta = self.store.create_directory(request.share, request.parts, SmbChanges.from_headers(request.headers),
                                           parse_metadata(request))
        return Response(201, {**entity_headers(meta), **smb_headers(meta), "x-ms-request-server-encrypted": "true"})

    def get_directory_properties(self, request: Request) -> Response:
        meta = self.store.get_directory(request.share, request.parts)
        headers = {**entity_headers(meta), **metadata_headers(meta["meta"]), **smb_headers(meta),
                   "x-ms-server-encrypted": "true"}
        return Response(200, headers)

    def delete_directory(self, request: Request) -> Response:
        self.store.delete_directory(request.share, request.parts)
        return Response(202)

    def set_directory_metadata(self, request: Request) -> Response:
        metadata = parse_metadata(request)
        meta = self.store.update_entry(request.share, request.parts, True,
                                       _replace_entry_metadata(metadata))
        return Response(200, {**entity_headers(meta), "x-ms-request-server-encrypted": "true"})

    def set_directory_properties(self, request: Request) -> Response:
        changes = SmbChanges.from_headers(request.headers)
        meta = self.store.update_entry(
            request.share, request.parts, True,
            _apply_directory_smb_changes(changes))
        return Response(200, {**entity_headers(meta), **smb_headers(meta), "x-ms-request-server-encrypted": "true"})

    def list_directory(self, request: Request) -> Response:
        prefix = request.query.get("prefix", "")
        marker = request.query.get("marker")
        max_results = min(_max_results(request), self.page_limit)
        include = _list_includes(request)
        extended = parse_bool_header(request, "x-ms-file-extended-info") or bool(include)
        directory, children = self.store.list_directory(request.share, request.parts)
        folded_prefix = prefix.casefold()
        children = [child for child in children if child[0].casefold().startswith(folded_prefix)]
        if marker:
            resume = listing_sort_key(decode_marker(marker))
            children = [child for child in children if listing_sort_key(child[0]) >= resume]
        page, rest = children[:max_results], children[max_results:]
        entries = "".join(_listing_entry(name, is_dir, meta, include) for name, is_dir, meta in page)
        document = (
            f"<EnumerationResults ServiceEndpoint={quoteattr(self._service_endpoint(request))} "
            f"ShareName={quoteattr(request.share)} DirectoryPath={quoteattr('/'.join(request.parts))}>"
            + (f"<Marker>{xml_text(marker)}</Marker>" if marker else "")
            + xml_name("Prefix", prefix)
            + (f"<MaxResults>{max_results}</MaxResults>" if "maxresults" in request.query else "")
            + (f"<DirectoryId>{directory['id']}</DirectoryId>" if extended else "")
            + f"<Entries>{entries}</Entries>"
            f"<NextMarker>{encode_marker(rest[0][0]) if rest else ''}</NextMarker></EnumerationResults>")
        return xml_response(200, document)

    def rename_directory(self, request: Request) -> Response:
        return self._rename(request, is_directory=True)

    def list_handles(self, request: Request) -> Response:
        return xml_response(200, "<EnumerationResults><Entries /><NextMarker /></EnumerationResults>")

    def force_close_handles(self, request: Request) -> Response:
        return Response(200, {"x-ms-number-of-handles-closed": "0", "x-ms-number-of-handles-failed": "0"})

    # ----- files -------------------------------------------------------------

    def create_file(self, request: Request) -> Response:
        if (request.header("x-ms-type") or "").lower() != "file":
            raise invalid_header("x-ms-type", request.header("x-ms-type"))
        size = parse_int_header(request, "x-ms-content-length", required=True)
        meta = self.store.create_file(request.share, request.parts, size, SmbChanges.from_headers(request.headers),
                                      parse_metadata(request), parse_content_headers(request),
                                      Conditions.from_headers(request.headers))
        return Response(201, {**entity_headers(meta), **smb_headers(meta), "x-ms-request-server-encrypted": "true"})

    def _refuse_read_conditions(self, request: Request) -> None:
        if not self.conditional_reads and any(
                request.header(name) for name in ("If-Match", "If-None-Match", "If-Modified-Since",
                                                  "If-Unmodified-Since")):
            raise _error("ConditionHeadersNotSupported", 400, "Condition headers are not supported.")

    def get_file_properties(self, request: Request) -> Response:
        self._refuse_read_conditions(request)
        meta = self.store.get_file(request.share, request.parts)
        Conditions.from_headers(request.headers).check(meta["etag"], meta["mtime"], is_read=True)
        headers = file_headers(meta, request)
        if meta["http"].get("content_md5"):
            headers["Content-MD5"] = meta["http"]["content_md5"]
        return Response(200, headers, head_length=meta["size"])

    def download_file(self, request: Request) -> Response:
        self._refuse_read_conditions(request)
        byte_range = parse_byte_range(request, for_write=False)
        want_md5 = parse_bool_header(request, "x-ms-range-get-content-md5")
        conditions = Conditions.from_headers(request.headers)
        opened = self.store.open_file(request.share, request.parts)
        try:
            conditions.check(opened.meta["etag"], opened.meta["mtime"], is_read=True)
            response = self._file_content(request, opened, byte_range, want_md5)
        except BaseException:
            os.close(opened.fd)
            raise
        return response

    def _file_content(self, request: Request, opened: FileRead, byte_range, want_md5: bool) -> Response:
        """Build the (possibly partial) content response; streams from opened.fd."""
        headers = file_headers(opened.meta, request)
        headers["Accept-Ranges"] = "bytes"
        stored_md5 = opened.meta["http"].get("content_md5")
        size = opened.size
        if byte_range is None:
            if want_md5:
                raise missing_header("x-ms-range")
            if stored_md5:
                headers["Content-MD5"] = stored_md5
            return Response(200, headers, stream=(opened.fd, 0, size))
        start, end = byte_range
        if start >= size:
            raise invalid_range(size)
        end = size - 1 if end is None else min(end, size - 1)
        length = end - start + 1
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        if stored_md5:
            headers["x-ms-content-md5"] = stored_md5
        if want_md5:
            if length > MAX_RANGE_SIZE:
                raise invalid_header("x-ms-range", request.header("x-ms-range") or request.header("Range"))
            headers["Content-MD5"] = md5_base64(_pread_all(opened.fd, start, length))
        return Response(206, headers, stream=(opened.fd, start, length))

    def delete_file(self, request: Request) -> Response:
        self.store.delete_file(request.share, request.parts, Conditions.from_headers(request.headers))
        return Response(202)

    def set_file_properties(self, request: Request) -> Response:
        size = parse_int_header(request, "x-ms-content-length")
        content = parse_content_headers(request)
        changes = SmbChanges.from_headers(request.headers)

        def change(share: Share, entry: Entry, meta: dict) -> None:
            apply_smb_changes(meta, changes, False, creating=False)
            # Set File Properties replaces all content headers at once;
            # anything not sent is cleared, as in the service.
            meta["http"] = content
            if size is not None:
                self.store.resize_file(share, entry, meta, size)

        meta = self.store.update_entry(request.share, request.parts, False, change,
                                       Conditions.from_headers(request.headers))
        return Response(200, {**entity_headers(meta), **smb_headers(meta), "x-ms-request-server-encrypted": "true"})

    def set_file_metadata(self, request: Request) -> Response:
        metadata = parse_metadata(request)
        meta = self.store.update_entry(request.share, request.parts, False,
                                       _replace_entry_metadata(metadata),
                                       Conditions.from_headers(request.headers))
        return Response(200, {**entity_headers(meta), "x-ms-request-server-encrypted": "true"})

    def put_range(self, request: Request) -> Response:
        byte_range = parse_byte_range(request, for_write=True)
        if byte_range is None:
            raise missing_header("x-ms-range")
        start, end = byte_range
        if end is None:
            raise invalid_header("x-ms-range", request.header("x-ms-range") or request.header("Range"))
        mode = (request.header("x-ms-write") or "").lower()
        if mode not in ("update", "clear"):
            if not mode:
                raise missing_header("x-ms-write")
            raise invalid_header("x-ms-write", mode)
        length = end - start + 1
        touch_write_time = (request.header("x-ms-file-last-write-time") or "now").lower() != "preserve"
        conditions = Conditions.from_headers(request.headers)
        if mode == "clear":
            if request.body:
                raise invalid_header("Content-Length", str(len(request.body)))
            meta = self.store.write_range(request.share, request.parts, start, end, None,
                                          touch_write_time, conditions)
            return Response(201, {**entity_headers(meta), "x-ms-file-last-write-time": meta["wtime"]})
        if length > MAX_RANGE_SIZE:
            raise _error("RequestBodyTooLarge", 413,
                         "The request body is too large and exceeds the maximum permissible limit.",
                         detail=f"MaxLimit: {MAX_RANGE_SIZE}")
        if len(request.body) != length:
            raise invalid_header("Content-Length", str(len(request.body)))
        computed_md5 = md5_base64(request.body)
        sent_md5 = decode_md5_header(request, "Content-MD5")
        if sent_md5 is not None and sent_md5 != computed_md5:
            raise _error("Md5Mismatch", 400, "The MD5 value specified in the request did not match with the "
                         "MD5 value calculated by the server.")
        meta = self.store.write_range(request.share, request.parts, start, end, request.body,
                                      touch_write_time, conditions)
        return Response(201, {**entity_headers(meta), "Content-MD5": computed_md5,
                              "x-ms-request-server-encrypted": "true",
                              "x-ms-file-last-write-time": meta["wtime"]})

    def list_ranges(self, request: Request) -> Response:
        if request.query.get("prevsharesnapshot"):
            raise not_implemented("list ranges against a previous snapshot")
        meta, ranges = self.store.file_ranges(request.share, request.parts)
        byte_range = parse_byte_range(request, for_write=False)
        if byte_range is not None:
            start, end = byte_range
            ranges = clip_ranges(ranges, start, end if end is not None else max(meta["size"] - 1, start))
        # Paged by list_ranges(); the marker is the start offset of the next range.
        paged = "marker" in request.query or "maxresults" in request.query
        marker = request.query.get("marker")
        if marker:
            if not marker.isdigit():
                raise invalid_query("marker", marker)
            ranges = [item for item in ranges if item[0] >= int(marker)]
        page, rest = ranges[:_max_results(request)], ranges[_max_results(request):]
        document = "<Ranges>" + "".join(
            f"<Range><Start>{low}</Start><End>{high}</End></Range>" for low, high in page)
        if paged:
            document += f"<NextMarker>{rest[0][0] if rest else ''}</NextMarker>"
        document += "</Ranges>"
        return xml_response(200, document, {**entity_headers(meta), "x-ms-content-length": str(meta["size"])})

    def rename_file(self, request: Request) -> Response:
        return self._rename(request, is_directory=False)

    def _rename(self, request: Request, is_directory: bool) -> Response:
        source = request.header("x-ms-file-rename-source")
        if not source:
            raise missing_header("x-ms-file-rename-source")
        source_share, source_parts = self._rename_source(request, source)
        if source_share != request.share:
            raise _error("InvalidInput", 400, "The source and destination must be in the same share.")
        metadata = parse_metadata(request) or None
        meta = self.store.rename(request.share, source_parts, request.parts, is_directory,
                                 parse_bool_header(request, "x-ms-file-rename-replace-if-exists"),
                                 SmbChanges.from_headers(request.headers), metadata)
        return Response(200, {**entity_headers(meta), **smb_headers(meta), "x-ms-request-server-encrypted": "true"})

    def _rename_source(self, request: Request, source: str) -> tuple[Optional[str], list[str]]:
        """Parse x-ms-file-rename-source: a full URL (maybe with SAS) or a share-relative path."""
        if "://" in source:
            path = urlsplit(source).path
        else:
            path = f"/{self.account}/{request.share}/{source.split('?', 1)[0].lstrip('/')}"
        allow_trailing_dot = (request.header("x-ms-source-allow-trailing-dot") or "").lower() == "true"
        share, parts, _ = split_target(path, self.account, allow_trailing_dot)
        return share, parts


def _replace_share_key(key: str, value) -> Callable[[dict], None]:
    def change(props: dict) -> None:
        props[key] = value
    return change


def _replace_entry_metadata(metadata: dict[str, str]) -> Callable[[Share, Entry, dict], None]:
    # Set Metadata replaces the whole set; names not sent are dropped.
    def change(share: Share, entry: Entry, meta: dict) -> None:
        meta["meta"] = metadata
    return change


def _apply_directory_smb_changes(changes: SmbChanges) -> Callable[[Share, Entry, dict], None]:
    def change(share: Share, entry: Entry, meta: dict) -> None:
        apply_smb_changes(meta, changes, True, creating=False)
    return change


def _max_results(request: Request) -> int:
    value = request.query.get("maxresults")
    if value is None:
        return MAX_LIST_RESULTS
    if not value.isdigit() or int(value) < 1:
        raise _error("OutOfRangeQueryParameterValue", 400, "One of the query parameters specified in the "
                     "request URI is outside the permissible range.",
                     detail=f"QueryParameterName: maxresults, QueryParameterValue: {value}")
    return min(int(value), MAX_LIST_RESULTS)


def _list_includes(request: Request) -> set[str]:
    allowed = {"timestamps", "etag", "attributes", "permissionkey"}
    include = {item.strip().lower() for item in request.query.get("include", "").split(",") if item.strip()}
    unknown = include - allowed
    if unknown:
        raise invalid_query("include", request.query.get("include"))
    return include


def _listing_entry(name: str, is_directory: bool, meta: dict, include: set[str]) -> str:
    tag = "Directory" if is_directory else "File"
    properties = "" if is_directory else f"<Content-Length>{meta['size']}</Content-Length>"
    if "timestamps" in include:
        properties += (f"<CreationTime>{meta['ctime']}</CreationTime>"
                       f"<LastAccessTime>{meta['wtime']}</LastAccessTime>"
                       f"<LastWriteTime>{meta['wtime']}</LastWriteTime>"
                       f"<ChangeTime>{meta['chtime']}</ChangeTime>"
                       f"<Last-Modified>{http_date(meta['mtime'])}</Last-Modified>")
    if "etag" in include:
        properties += f"<Etag>{xml_text(meta['etag'])}</Etag>"
    extra = ""
    if "attributes" in include:
        extra += f"<Attributes>{xml_text(meta['attrs'])}</Attributes>"
    if "permissionkey" in include:
        extra += f"<PermissionKey>{xml_text(meta['perm'])}</PermissionKey>"
    return (f"<{tag}>{xml_name('Name', name)}<FileId>{meta['id']}</FileId>"
            f"<Properties>{properties}</Properties>{extra}</{tag}>")


def _pread_all(fd: int, offset: int, length: int) -> bytes:
    chunks = []
    while length > 0:
        chunk = os.pread(fd, min(length, READ_CHUNK), offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return b"".join(chunks)


# Routing tables: (method, comp) -> (handler, account SAS resource type,
# SAS permissions any one of which grants the operation).  HEAD is routed as GET.
_SERVICE_OPERATIONS = {
    ("GET", "list"): (Emulator.list_shares, "s", "l"),
    ("GET", "properties"): (Emulator.get_service_properties, "s", "r"),
    ("PUT", "properties"): (Emulator.set_service_properties, "s", "w"),
}
_SHARE_OPERATIONS = {
    ("PUT", None): (Emulator.create_share, "c", "cw"),
    ("GET", None): (Emulator.get_share_properties, "c", "r"),
    ("DELETE", None): (Emulator.delete_share, "c", "d"),
    ("GET", "metadata"): (Emulator.get_share_properties, "c", "r"),
    ("PUT", "metadata"): (Emulator.set_share_metadata, "c", "w"),
    ("PUT", "properties"): (Emulator.set_share_properties, "c", "w"),
    ("GET", "stats"): (Emulator.get_share_stats, "c", "r"),
    ("GET", "acl"): (Emulator.get_share_acl, "c", "r"),
    ("PUT", "acl"): (Emulator.set_share_acl, "c", "w"),
}
_DIRECTORY_OPERATIONS = {
    ("PUT", None): (Emulator.create_directory, "o", "cw"),
    ("GET", None): (Emulator.get_directory_properties, "o", "r"),
    ("DELETE", None): (Emulator.delete_directory, "o", "d"),
    ("GET", "metadata"): (Emulator.get_directory_properties, "o", "r"),
    ("PUT", "metadata"): (Emulator.set_directory_metadata, "o", "w"),
    ("PUT", "properties"): (Emulator.set_directory_properties, "o", "w"),
    ("GET", "list"): (Emulator.list_directory, "c", "l"),
    ("PUT", "rename"): (Emulator.rename_directory, "o", "w"),
    ("GET", "listhandles"): (Emulator.list_handles, "o", "l"),
    ("PUT", "forceclosehandles"): (Emulator.force_close_handles, "o", "w"),
}
_FILE_OPERATIONS = {
    ("PUT", None): (Emulator.create_file, "o", "cw"),
    ("GET", None): (Emulator.download_file, "o", "r"),
    ("HEAD", None): (Emulator.get_file_properties, "o", "r"),
    ("DELETE", None): (Emulator.delete_file, "o", "d"),
    ("GET", "metadata"): (Emulator.get_file_properties, "o", "r"),
    ("PUT", "metadata"): (Emulator.set_file_metadata, "o", "w"),
    ("PUT", "properties"): (Emulator.set_file_properties, "o", "w"),
    ("PUT", "range"): (Emulator.put_range, "o", "w"),
    ("GET", "rangelist"): (Emulator.list_ranges, "o", "r"),
    ("PUT", "rename"): (Emulator.rename_file, "o", "w"),
    ("GET", "listhandles"): (Emulator.list_handles, "o", "l"),
    ("PUT", "forceclosehandles"): (Emulator.force_close_handles, "o", "w"),
}
_UNSUPPORTED_COMPS = {"lease", "snapshot", "filepermission", "copy", "undelete", "symboliclink", "hardlink",
                      "userdelegationkey"}


# --------------------------------------------------------------------------
# HTTP server
# --------------------------------------------------------------------------


def _unexpected_error(error: Exception) -> StorageError:
    if isinstance(error, OSError) and error.errno == errno.ENAMETOOLONG:
        # Names within Azure's 255 characters can exceed 255 UTF-8 bytes.
        return invalid_name()
    traceback.print_exc(file=sys.stderr)
    return _error("InternalError", 500, "Server encountered an internal error.")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes; with Nagle's algorithm the
    # body waits for the client's delayed ACK (40 ms per small response).
    disable_nagle_algorithm = True
    server: "_Server"

    def version_string(self) -> str:
        return "Windows-Azure-File/1.0 Microsoft-HTTPAPI/2.0"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - signature from the base class
        if self.server.verbose:
            super().log_message(format, *args)

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_DELETE = do_POST = do_PATCH = do_OPTIONS = do_GET

    def _handle(self) -> None:
        request_id = str(uuid.uuid4())
        response: Response
        try:
            request = self._parse_request()
            parse_target(request, self.server.emulator.account)
            response = self.server.emulator.handle(request)
        except StorageError as error:
            if error.close_connection:
                self.close_connection = True
            response = error_response(error, request_id)
        except Exception as error:  # noqa: BLE001 - report any bug as the service's 500
            response = error_response(_unexpected_error(error), request_id)
        self._send(response, request_id)

    def _parse_request(self) -> Request:
        body = self._read_body()
        target = self.path
        if "://" in target:  # absolute-form request target
            parts = urlsplit(target)
            target = parts.path + ("?" + parts.query if parts.query else "")
        raw_path, _, raw_query = target.partition("?")
        pairs = parse_query(raw_query)
        return Request(
            method=self.command, raw_path=raw_path, raw_query=raw_query, query_pairs=pairs,
            query={name.lower(): value for name, value in pairs}, headers=self.headers, body=body,
            client_ip=self.client_address[0], host=self.headers.get("Host") or "127.0.0.1",
            secure=isinstance(self.connection, ssl.SSLSocket),
        )

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length_header = self.headers.get("Content-Length")
        if not length_header:
            return b""
        if not length_header.strip().isdigit():
            self.close_connection = True
            raise invalid_header("Content-Length", length_header)
        length = int(length_header)
        if length > MAX_REQUEST_BODY:
            error = _error("RequestBodyTooLarge", 413, "The request body is too large and exceeds the "
                           "maximum permissible limit.", detail=f"MaxLimit: {MAX_REQUEST_BODY}")
            # Clients send the whole body before reading the answer, so
            # swallow it (within reason) to deliver a clean 413 instead of a
            # broken pipe; otherwise drop the connection, as the unread body
            # would corrupt the next request.
            if length <= MAX_DRAINED_BODY:
                self._discard(length)
            else:
                error.close_connection = True
            raise error
        return self.rfile.read(length)

    def _discard(self, length: int) -> None:
        while length > 0:
            chunk = self.rfile.read(min(length, READ_CHUNK))
            if not chunk:
                break
            length -= len(chunk)

    def _read_chunked(self) -> bytes:
        chunks, total = [], 0
        while True:
            size_line = self.rfile.readline(1024).split(b";", 1)[0].strip()
            try:
                size = int(size_line, 16)
            except ValueError:
                self.close_connection = True
                raise invalid_header("Transfer-Encoding", "chunked") from None
            if size == 0:
                while self.rfile.readline(1024).strip():
                    pass  # trailers
                return b"".join(chunks)
            total += size
            if total > MAX_REQUEST_BODY:
                error = _error("RequestBodyTooLarge", 413, "The request body is too large and exceeds the "
                               "maximum permissible limit.")
                error.close_connection = True
                raise error
            chunks.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _send(self, response: Response, request_id: str) -> None:
        headers = dict(response.headers)
        headers["x-ms-request-id"] = request_id
        headers["x-ms-version"] = (self.headers.get("x-ms-version") or DEFAULT_API_VERSION).strip()
        client_request_id = self.headers.get("x-ms-client-request-id")
        if client_request_id:
            headers["x-ms-client-request-id"] = client_request_id
        headers["Date"] = http_date(time.time())
        if response.stream is not None:
            length = response.stream[2]
        elif self.command == "HEAD" and response.head_length is not None:
            length = response.head_length
        else:
            length = len(response.body)
        headers["Content-Length"] = str(length)
        if self.close_connection:
            headers["Connection"] = "close"
        try:
            self.send_response_only(response.status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                if response.stream is not None:
                    self._stream(*response.stream)
                elif response.body:
                    self.wfile.write(response.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            if response.stream is not None:
                os.close(response.stream[0])

    def _stream(self, fd: int, offset: int, length: int) -> None:
        while length > 0:
            chunk = os.pread(fd, min(length, READ_CHUNK), offset)
            if not chunk:
                # The file shrank after the headers went out; the only
                # honest thing left is to drop the connection.
                self.close_connection = True
                return
            self.wfile.write(chunk)
            offset += len(chunk)
            length -= len(chunk)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, emulator: Emulator, verbose: bool = False,
                 ssl_context: Optional[ssl.SSLContext] = None):
        self.emulator = emulator
        self.verbose = verbose
        self.ssl_context = ssl_context
        self._connections: set[socket.socket] = set()
        self._connections_lock = threading.Lock()
        super().__init__(address, _Handler)

    def get_request(self):
        connection, address = super().get_request()
        if self.ssl_context is not None:
            # The handshake happens on the first read, in the connection's
            # own thread: a client that never completes it holds up nobody.
            connection = self.ssl_context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        return connection, address

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-response (a reader abandoning a body it
        # does not want) is normal traffic, not an emulator fault; so is one
        # that refuses the certificate or drops the TLS session.
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError, ssl.SSLError)):
            return
        super().handle_error(request, client_address)

    def process_request(self, request, client_address) -> None:
        with self._connections_lock:
            self._connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request) -> None:
        with self._connections_lock:
            self._connections.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Drop idle keep-alive connections so a stopped emulator stops answering."""
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                # socket.socket's own shutdown: SSLSocket.shutdown would also
                # drop its TLS state under the feet of the handler thread.
                socket.socket.shutdown(connection, socket.SHUT_RDWR)


class FileShareEmulator(BackgroundServer):
    """Runs the emulator in a background thread, for test fixtures.

    ``location`` defaults to a fresh temporary directory that is removed by
    ``stop()``; a directory passed in is left in place."""

    thread_name = "fileshare-emulator"

    def __init__(self, host: str = "127.0.0.1", port: int = 0, location: Optional[str] = None,
                 verbose: bool = False, page_limit: int = MAX_LIST_RESULTS, conditional_reads: bool = True,
                 certfile: Optional[str] = None, keyfile: Optional[str] = None):
        if (certfile is None) != (keyfile is None):
            raise ValueError("certfile and keyfile go together")
        self.certfile, self.keyfile = certfile, keyfile
        self.page_limit = page_limit
        self.conditional_reads = conditional_reads
        self.host = host
        self._requested_port = port
        self._owns_location = location is None
        self.location = location or tempfile.mkdtemp(prefix="fileshare-emulator-")
        self.verbose = verbose
        super().__init__()

    def _make_server(self):
        store = FileStore(self.location)
        context = None
        if self.certfile is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(self.certfile, self.keyfile)
        return _Server((self.host, self._requested_port), Emulator(store, page_limit=self.page_limit,
                                                                 conditional_reads=self.conditional_reads),
                       self.verbose, ssl_context=context)

    def _cut(self, server) -> None:
        server.close_connections()

    def stop(self) -> None:
        super().stop()
        if self._owns_location:
            shutil.rmtree(self.location, ignore_errors=True)

    @property
    def tls(self) -> bool:
        return self.certfile is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def bearer_accepted(self) -> int:
        """How many requests were let in on a bearer token."""
        if self._server is None:
            raise RuntimeError("the emulator is not running")
        return self._server.emulator.authenticator.bearer_accepted

    @property
    def account_name(self) -> str:
        return ACCOUNT_NAME

    @property
    def account_key(self) -> str:
        return ACCOUNT_KEY

    @property
    def account_url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}/{ACCOUNT_NAME}"

    @property
    def connection_string(self) -> str:
        return (f"DefaultEndpointsProtocol={self.scheme};AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
                f"FileEndpoint={self.account_url};")


def main(argv: Optional[Iterable[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Azure Files REST API emulator for tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=10004, help="0 picks a free port")
    parser.add_argument("--location", default=None, help="data directory (default: a temporary directory)")
    parser.add_argument("--verbose", action="store_true", help="log every request to stderr")
    parser.add_argument("--page-limit", type=int, default=MAX_LIST_RESULTS,
                        help="most entries in one directory listing page (the service may return fewer "
                             "than asked)")
    parser.add_argument("--cert", default=None, help="serve HTTPS with this certificate (PEM, chain after it)")
    parser.add_argument("--key", default=None, help="the certificate's private key (PEM)")
    args = parser.parse_args(list(argv) if argv is not None else None)
    if (args.cert is None) != (args.key is None):
        parser.error("--cert and --key go together")

    emulator = FileShareEmulator(args.host, args.port, args.location, args.verbose, page_limit=args.page_limit,
                                 certfile=args.cert, keyfile=args.key)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    emulator.start()
    try:
        print(f"listening on {emulator.account_url}", flush=True)
        while not stop.wait(3600):
            pass
    finally:
        emulator.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
