"""A throw-away certificate authority for the HTTPS lanes of the tests.

Real Azure storage is HTTPS only; the tests get there with a CA made fresh
for each session (trustme) that signs one server certificate for 127.0.0.1
and localhost, used by Azurite, the Files emulator and anything else that
listens on loopback. The CA is never added to a system store: a test trusts
it by pointing a client at `ca_path` (`connection_verify=`, `verify=`) or
by setting the variables of `env()` (SSL_CERT_FILE for Python's ssl module
and urllib3, REQUESTS_CA_BUNDLE for requests) in a monkeypatched or child
environment."""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

SERVER_NAMES = ("127.0.0.1", "localhost")


@dataclass(frozen=True)
class LocalCA:
    """Paths of the CA certificate and the server's certificate and key, all PEM."""

    directory: Path
    ca_path: str        # ca.pem: what a client trusts
    cert_path: str      # server-cert.pem: the server's certificate and its chain
    key_path: str       # server-key.pem: the server's private key
    names: tuple[str, ...] = SERVER_NAMES

    def env(self) -> dict[str, str]:
        """Variables that make Python clients (ssl, urllib3, requests) trust
        this CA, and only it, for the process that gets them."""
        return {"SSL_CERT_FILE": self.ca_path, "REQUESTS_CA_BUNDLE": self.ca_path}

    def server_context(self) -> ssl.SSLContext:
        """A server-side context with the certificate, for Python servers."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts this CA alone."""
        return ssl.create_default_context(cafile=self.ca_path)


def make_local_ca(directory, names: tuple[str, ...] = SERVER_NAMES) -> LocalCA:
    """A new CA and a server certificate for `names`, written into `directory`
    (ca.pem, server-cert.pem, server-key.pem)."""
    import trustme

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="mountd tests")
    leaf = ca.issue_cert(*names)
    ca_path, cert_path, key_path = (directory / n for n in ("ca.pem", "server-cert.pem", "server-key.pem"))
    ca.cert_pem.write_to_path(str(ca_path))
    # The chain file holds the leaf first, then any intermediates: the form
    # both Node (Azurite's --cert) and ssl.load_cert_chain expect.
    with open(cert_path, "wb") as f:
        for blob in leaf.cert_chain_pems:
            f.write(blob.bytes())
    leaf.private_key_pem.write_to_path(str(key_path))
    os.chmod(key_path, 0o600)
    return LocalCA(directory, str(ca_path), str(cert_path), str(key_path), tuple(names))
