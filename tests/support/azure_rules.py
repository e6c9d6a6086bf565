"""A gateway in front of Azurite that refuses what Azure refuses and Azurite
lets through, so tests of server-side copies fail here as they would on the
real service.

Azurite copies whatever it is asked to: it never checks who may read a
copy's source, nor the size limit of a synchronous copy. Azure does (the
REST reference of Copy Blob, Copy Blob From URL and Put Block From URL):

- Copy Blob From URL (`x-ms-copy-source` with `x-ms-requires-sync: true`),
  Put Blob From URL, Put Block From URL (`comp=block`) and the other
  "from URL" writes read their source as an outside caller would: it must
  be public, carry a SAS (`sig=` in its URL) or come with
  `x-ms-copy-source-authorization: Bearer ...`. The request's own Shared
  Key or bearer token says nothing about the source. Refused with
  CannotVerifyCopySource, carrying the answer the source gave (as
  x-ms-copy-source-status-code / -error-code and in the XML body), whose
  status is the answer's: 404 for the anonymous read (a private blob does
  not exist for it), 401 for a token the gateway does not know or another
  scheme, 403 for a SAS that does not grant read.
- Copy Blob From URL of a source over 256 MiB: 409 Conflict (the source's
  size is asked of Azurite with the account key). The reference gives no
  error code for this; CannotVerifyCopySource, the code of copy failures,
  stands in.
- The asynchronous Copy Blob reads a source in the same account with the
  request's own Shared Key or bearer token (2017-11-09 and later); a SAS on
  the request covers only the destination, so a source named without a
  SAS is read anonymously then, as is any source in another account.

- A blob written under a name over 1 024 characters or 254 path segments
  ("Naming and Referencing Containers, Blobs, and Metadata": the reference
  gives 400 Bad Request for names that break the rules; Azurite takes them):
  400 InvalidResourceName.

Everything else is forwarded unchanged, bodies streamed both ways.

Two more things Azurite cannot do:

- Bearer tokens (`tokens`, with `tls` since clients send them only over
  HTTPS): a request with `Authorization: Bearer <one of tokens>` is signed
  again with the account key before it goes to Azurite, so an identity's
  requests can be tested without an OAuth server. Other tokens get 401.
- Copies that take time: Azurite finishes an asynchronous copy before it
  answers. With `pending_polls=n`, the gateway says `pending` in the answer
  to each Copy Blob and in the next n property reads of its destination,
  then reports `copy_outcome` ("success", "failed"), and takes an Abort Copy
  Blob of such a copy itself (the copy is then "aborted").

Every copy-like request is recorded in `copies` (what it was, how its
source was authorised, what the gateway answered) for tests to check.

    gateway = AzureRules(azurite.port).start()
    entry = blob_workspace_entry(azurite, container)
    entry["endpoint"] = gateway.url(azurite.account_url)
"""

from __future__ import annotations

import datetime
import http.client
import socket
import ssl
import uuid
from email.utils import formatdate
from urllib.parse import parse_qsl, quote, unquote, urlsplit, urlunsplit
from xml.sax.saxutils import escape

from tests.support.azurite import ACCOUNT, KEY
from tests.support.relay import Relay
from tests.support.faultproxy import _Closed, _Reader, _body_pieces, _headers, _read_head

BLOB_NAME_MAX, BLOB_SEGMENTS_MAX = 1024, 254  # characters, path segments
SYNC_COPY_MAX = 256 * 1024 * 1024  # Copy Blob From URL: "source blob sizes up to 256 MiB"
# "From URL" writes: the request has `comp=` one of these, or is Put Blob From
# URL (x-ms-blob-type), or Copy Blob From URL (x-ms-requires-sync).
FROM_URL_COMPS = {"block", "appendblock", "page"}
# The header names Shared Key signs by name (mountd's Signer expects this case).
SIGNED_STANDARD = ("Content-Encoding", "Content-Language", "Content-Length", "Content-MD5", "Content-Type", "Date",
                   "If-Modified-Since", "If-Match", "If-None-Match", "If-Unmodified-Since", "Range")
REASONS = {201: "Created", 202: "Accepted", 204: "No Content", 400: "Bad Request", 401: "Unauthorized",
           403: "Forbidden", 404: "Not Found", 409: "Conflict"}


class Refusal(Exception):
    """The answer Azure gives instead of doing the request."""

    def __init__(self, status: int, code: str, message: str, source: tuple[int, str, str] | None = None,
                 extra: dict | None = None):
        super().__init__(f"{status} {code}")
        self.status, self.code, self.message, self.source = status, code, message, source
        self.extra = extra or {}


def _source_refused(status: int, code: str, message: str) -> Refusal:
    """CannotVerifyCopySource, carrying the source's own answer as Azure
    reports it (x-ms-copy-source-status-code / -error-code, and the same in
    the XML body), with the source's status as the answer's."""
    return Refusal(status, "CannotVerifyCopySource", message, (status, code, message))


class AzureRules(Relay):
    thread_name = "azure-rules"

    def __init__(self, upstream_port: int, account: str = ACCOUNT, key: str = KEY, tokens=(),
                 tls: tuple[str, str] | None = None, pending_polls: int = 0, copy_outcome: str = "success"):
        super().__init__()
        self.upstream = ("127.0.0.1", upstream_port)
        self.account, self.key = account, key
        self.tokens = set(tokens)  # bearer tokens of identities allowed in the account
        self.pending_polls = pending_polls
        self.copy_outcome = copy_outcome
        self.copies: list[dict] = []  # every copy-like request: what it was and what it got
        self._simulated: dict[str, dict] = {}  # destination path -> a copy made to look pending
        self._tls = None
        if tls:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(*tls)

    # -- control -----------------------------------------------------------------
    def url(self, account_url: str) -> str:
        """`account_url` with the gateway's scheme, host and port."""
        parts = urlsplit(account_url)
        return urlunsplit(("https" if self._tls else "http", f"127.0.0.1:{self.port}", parts.path, "", ""))

    def refused(self) -> list[dict]:
        """The copy-like requests the gateway refused."""
        return [c for c in self.copies if c["answer"] != "forwarded"]

    def slow_copies(self) -> list[dict]:
        """The copies made to look pending: {"id", "status", "left"} (the
        pending answers still to give)."""
        with self._lock:
            return [dict(c) for c in self._simulated.values()]

    # -- the rules -----------------------------------------------------------------
    def _judge(self, method: str, target: str, headers: dict) -> dict | None:
        """What a copy-like request is, for `copies`; raises Refusal where
        Azure would refuse it. None for any other request."""
        source_url = headers.get("x-ms-copy-source")
        if method != "PUT" or not source_url:
            return None
        path, _, query_string = target.partition("?")
        query = dict(parse_qsl(query_string, keep_blank_values=True))
        comp = query.get("comp")
        if comp == "incrementalcopy":
            return None  # page blob snapshots: not used by mountd
        source = urlsplit(source_url)
        source_query = dict(parse_qsl(source.query, keep_blank_values=True))
        source_auth = headers.get("x-ms-copy-source-authorization")
        sync = headers.get("x-ms-requires-sync", "").lower() == "true"
        from_url = sync or comp in FROM_URL_COMPS or "x-ms-blob-type" in headers
        record = {
            "op": ("copy-from-url" if sync else f"{comp}-from-url" if comp else "put-blob-from-url" if from_url
                   else "copy"),
            "target": unquote(path), "source": unquote(source.path), "source_sas": "sig" in source_query,
            "source_authorization": source_auth.split(" ", 1)[0] if source_auth else None,
            "auth": _auth_kind(headers, query), "answer": "forwarded"}
        with self._lock:
            self.copies.append(record)
        try:
            self._check_copy(record, path, source, source_query, source_auth, sync, from_url)
        except Refusal as refusal:
            record["answer"] = f"{refusal.status} {refusal.code}"
            raise
        return record

    def _check_copy(self, record: dict, path: str, source, source_query: dict, source_auth: str | None,
                    sync: bool, from_url: bool) -> None:
        if "sig" in source_query:
            if "r" not in source_query.get("sp", "r"):
                raise _source_refused(403, "AuthorizationPermissionMismatch", "This request is not authorized to "
                                      "perform this operation using this permission.")
        elif source_auth and from_url:
            scheme, _, token = source_auth.partition(" ")
            if scheme.lower() != "bearer" or token not in self.tokens:
                # Only bearer tokens are taken here, and only valid ones.
                raise _source_refused(401, "InvalidAuthenticationInfo", "Server failed to authenticate the request. "
                                      "Please refer to the information in the www-authenticate header.")
        elif from_url or _account_of(source) != _account_of_path(path) or record["auth"] == "SAS":
            # Nothing authorises the source: it is read anonymously, and a
            # blob in a private container does not exist for such a reader.
            raise _source_refused(404, "ResourceNotFound", "The specified resource does not exist.")
        if sync:
            size = self._size_of(source.path)
            if size is not None and size > SYNC_COPY_MAX:
                raise Refusal(409, "CannotVerifyCopySource", f"The source blob is {size} bytes; a synchronous "
                              f"copy takes sources of up to {SYNC_COPY_MAX} bytes.")

    def _size_of(self, source_path: str) -> int | None:
        """The source blob's size, asked of Azurite with the account key."""
        from mountd.storage.azure_http import API_VERSION, Signer
        path = quote(unquote(source_path), safe="/~")
        headers = {"x-ms-version": API_VERSION}
        Signer(self.account, self.key).sign("HEAD", path, headers)
        conn = http.client.HTTPConnection(*self.upstream, timeout=30)
        try:
            conn.request("HEAD", path, headers=headers)
            response = conn.getresponse()
            response.read()
            return int(response.getheader("Content-Length")) if response.status == 200 else None
        finally:
            conn.close()

    # -- bearer tokens -------------------------------------------------------------
    def _resign(self, method: str, target: str, head: bytes, headers: dict) -> bytes:
        """The request head with its bearer token checked and replaced by a
        Shared Key signature of the account (Azurite takes no tokens here)."""
        token = headers["authorization"][len("bearer "):].strip()
        if token not in self.tokens:
            raise Refusal(401, "InvalidAuthenticationInfo", "Server failed to authenticate the request. Please "
                          "refer to the information in the www-authenticate header.",
                          extra={"AuthenticationErrorDetail": "The token is not valid for this account."})
        from mountd.storage.azure_http import Signer
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        canonical = {h.lower(): h for h in SIGNED_STANDARD}
        fields = {canonical.get(name, name): value for name, value in headers.items()
                  if name not in ("authorization", "x-ms-date", "date")}
        path, _, query_string = target.partition("?")
        query: dict[str, str] = {}
        for name, value in parse_qsl(query_string, keep_blank_values=True):
            query[name] = f"{query[name]},{value}" if name in query else value
        # A zero Content-Length is signed as an empty field (versions 2015-02-21 on).
        length = fields.pop("Content-Length", None)
        if length not in (None, "0"):
            fields["Content-Length"] = length
        Signer(self.account, self.key).sign(method, path, fields, query)
        if length == "0":
            fields["Content-Length"] = "0"
        lines = [request_line] + [f"{name}: {value}" for name, value in fields.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    # -- copies that take time -------------------------------------------------------
    def _copy_answered(self, path: str, rhead: bytes, rheaders: dict) -> bytes:
        copy_id = rheaders.get("x-ms-copy-id")
        if not self.pending_polls or not copy_id:
            return rhead
        with self._lock:
            self._simulated[unquote(path)] = {"id": copy_id, "left": self.pending_polls, "status": "pending"}
        return _with_header(rhead, "x-ms-copy-status", "pending")

    def _properties_answered(self, path: str, rhead: bytes, rheaders: dict) -> bytes:
        with self._lock:
            copy = self._simulated.get(unquote(path))
            if copy is None or rheaders.get("x-ms-copy-id") != copy["id"]:
                return rhead
            if copy["status"] == "pending":
                if copy["left"] > 0:
                    copy["left"] -= 1
                else:
                    copy["status"] = self.copy_outcome
            status = copy["status"]
        rhead = _with_header(rhead, "x-ms-copy-status", status)
        if status == "failed":
            rhead = _with_header(rhead, "x-ms-copy-status-description", "500 InternalError Copy failed.")
        elif status == "aborted":
            rhead = _with_header(rhead, "x-ms-copy-status-description", "")
        return rhead

    def _abort(self, path: str, query: dict) -> bool:
        """Take an Abort Copy Blob of a copy made to look pending."""
        with self._lock:
            copy = self._simulated.get(unquote(path))
            if copy is None or copy["id"] != query.get("copyid") or copy["status"] != "pending":
                return False
            copy["status"] = "aborted"
            copy["left"] = 0
            return True

    # -- the work ----------------------------------------------------------------------
    def _serve(self, client: socket.socket) -> None:
        upstream = ureader = None
        raw = client
        try:
            if self._tls:
                client.settimeout(30)
                client = self._tls.wrap_socket(client, server_side=True)
                client.settimeout(None)
            creader = _Reader(client)
            while not self._stop.is_set():
                head = _read_head(creader)
                headers = _headers(head)
                parts = head.split(b" ", 2)
                method = parts[0].decode("latin-1")
                target = parts[1].decode("latin-1") if len(parts) > 2 else "/"
                path, _, query_string = target.partition("?")
                query = dict(parse_qsl(query_string, keep_blank_values=True))
                framed = "content-length" in headers or "transfer-encoding" in headers
                body = _body_pieces(creader, headers, no_body=not framed)
                try:
                    if headers.get("authorization", "").lower().startswith("bearer "):
                        head = self._resign(method, target, head, headers)
                    _check_name(method, path)
                    record = self._judge(method, target, headers)
                except Refusal as refusal:
                    for _ in body:  # the request is read whole before the answer
                        pass
                    client.sendall(_error_answer(refusal, headers))
                    continue
                if method == "PUT" and query.get("comp") == "copy" and \
                        headers.get("x-ms-copy-action", "").lower() == "abort" and self._abort(path, query):
                    for _ in body:
                        pass
                    client.sendall(_plain_answer(204, headers))
                    continue
                if upstream is None:
                    upstream = socket.create_connection(self.upstream, timeout=300)
                    upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    ureader = _Reader(upstream)
                upstream.sendall(head)
                for piece in body:
                    upstream.sendall(piece)
                rhead = _read_head(ureader)
                rheaders = _headers(rhead)
                status = int(rhead.split(b" ", 2)[1])
                if record is not None and status == 202 and record["op"] == "copy":
                    rhead = self._copy_answered(path, rhead, rheaders)
                elif method in ("HEAD", "GET") and "comp" not in query and status in (200, 206):
                    rhead = self._properties_answered(path, rhead, rheaders)
                no_body = method == "HEAD" or status in (204, 304) or 100 <= status < 200
                client.sendall(rhead)
                for piece in _body_pieces(ureader, rheaders, no_body):
                    client.sendall(piece)
                if "close" in (rheaders.get("connection", "").lower(), headers.get("connection", "").lower()):
                    return
        except (_Closed, OSError, ValueError):
            pass  # either side went away: the connection ends
        finally:
            self._forget(raw, client, upstream)


def _auth_kind(headers: dict, query: dict) -> str:
    scheme = headers.get("authorization", "").split(" ", 1)[0]
    if scheme:
        return {"sharedkey": "SharedKey", "bearer": "Bearer"}.get(scheme.lower(), scheme)
    return "SAS" if "sig" in query else "anonymous"


def _account_of(url) -> str:
    """The account a blob URL names: the first label of its host, or the
    first path segment for an IP address or localhost (path-style, as
    Azurite and the gateway are addressed)."""
    host = url.hostname or ""
    if host == "localhost" or host.replace(".", "").isdigit() or ":" in host:
        return _account_of_path(url.path)
    return host.split(".", 1)[0]


def _check_name(method: str, path: str) -> None:
    """Refuse a write of a blob whose name Azure would refuse (see the module
    docstring); `path` is /account/container/name."""
    name = unquote(path).lstrip("/").split("/", 2)[2:]
    if method == "PUT" and name and name[0] and (len(name[0]) > BLOB_NAME_MAX
                                                 or name[0].count("/") >= BLOB_SEGMENTS_MAX):
        raise Refusal(400, "InvalidResourceName", "The specified resource name length is not within the "
                      "permissible limits.")


def _account_of_path(path: str) -> str:
    return unquote(path).lstrip("/").split("/", 1)[0]


def _error_answer(refusal: Refusal, headers: dict) -> bytes:
    request_id = str(uuid.uuid4())
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f0Z")
    body = (f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{refusal.code}</Code>'
            f"<Message>{escape(refusal.message)}\nRequestId:{request_id}\nTime:{now}</Message>")
    lines = [f"HTTP/1.1 {refusal.status} {REASONS.get(refusal.status, 'Error')}",
             "Content-Type: application/xml", f"x-ms-error-code: {refusal.code}", f"x-ms-request-id: {request_id}",
             f"x-ms-version: {headers.get('x-ms-version', '')}", f"Date: {formatdate(usegmt=True)}",
             "Server: Windows-Azure-Blob/1.0 Microsoft-HTTPAPI/2.0"]
    if refusal.source:
        status, code, message = refusal.source
        lines += [f"x-ms-copy-source-status-code: {status}", f"x-ms-copy-source-error-code: {code}"]
        body += (f"<CopySourceStatusCode>{status}</CopySourceStatusCode><CopySourceErrorCode>{code}"
                 f"</CopySourceErrorCode><CopySourceErrorMessage>{escape(message)}</CopySourceErrorMessage>")
    if refusal.status == 401:
        lines.append("WWW-Authenticate: Bearer authorization_uri=https://login.microsoftonline.com/common/oauth2/"
                     "authorize resource_id=https://storage.azure.com")
    for name, value in refusal.extra.items():
        body += f"<{name}>{escape(value)}</{name}>"
    data = (body + "</Error>").encode()
    lines.append(f"Content-Length: {len(data)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + data


def _plain_answer(status: int, headers: dict) -> bytes:
    return (f"HTTP/1.1 {status} {REASONS.get(status, '')}\r\nx-ms-request-id: {uuid.uuid4()}\r\n"
            f"x-ms-version: {headers.get('x-ms-version', '')}\r\nDate: {formatdate(usegmt=True)}\r\n"
            f"Content-Length: 0\r\n\r\n").encode("latin-1")


def _with_header(head: bytes, name: str, value: str) -> bytes:
    """A response head with header `name` set to `value` (replaced if there)."""
    lines = head.split(b"\r\n")[:-2]
    key = name.lower().encode("latin-1") + b":"
    lines = [line for line in lines if not line.lower().startswith(key)]
    lines.append(f"{name}: {value}".encode("latin-1"))
    return b"\r\n".join(lines + [b"", b""])


def make_certificate(directory) -> tuple[str, str, str]:
    """A throw-away certificate authority and a server certificate it signed
    for 127.0.0.1: (CA file for clients to trust, server certificate file,
    server key file)."""
    import ipaddress
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mountd test CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    server = (x509.CertificateBuilder()
              .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
              .issuer_name(ca_name).public_key(server_key.public_key()).serial_number(x509.random_serial_number())
              .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
              .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                             critical=False)
              .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
              .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
              .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
              .sign(ca_key, hashes.SHA256()))
    paths = tuple(os.path.join(str(directory), name) for name in ("ca.pem", "server.pem", "server.key"))
    with open(paths[0], "wb") as f:
        f.write(ca.public_bytes(serialization.Encoding.PEM))
    with open(paths[1], "wb") as f:
        f.write(server.public_bytes(serialization.Encoding.PEM))
    with open(paths[2], "wb") as f:
        f.write(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))
    return paths


def put_large_blob(container, name: str, size: int, content_type: str = "application/octet-stream",
                   piece: int = 4 * 1024 * 1024) -> bytes:
    """Store a blob of `size` bytes at `name` in `container` (an SDK
    ContainerClient) with its MD5 and `content_type`; returns the MD5.
    Three random pieces are staged once and named over and over in the block
    list, so a blob over the synchronous copy limit costs a few MiB of
    upload, not hundreds."""
    import base64
    import hashlib
    import os

    from azure.storage.blob import BlobBlock, ContentSettings

    blob = container.get_blob_client(name)
    pieces = [os.urandom(piece) for _ in range(3)]
    ids = [base64.b64encode(f"piece-{i:04d}".encode()).decode() for i in range(len(pieces) + 1)]
    for block_id, data in zip(ids, pieces):
        blob.stage_block(block_id, data)
    md5 = hashlib.md5()
    blocks = []
    for i in range(size // piece):
        md5.update(pieces[i % len(pieces)])
        blocks.append(BlobBlock(ids[i % len(pieces)]))
    tail = pieces[0][:size % piece]
    if tail:
        blob.stage_block(ids[-1], tail)
        md5.update(tail)
        blocks.append(BlobBlock(ids[-1]))
    blob.commit_block_list(blocks, content_settings=ContentSettings(content_type=content_type,
                                                                    content_md5=md5.digest()))
    return md5.digest()
