"""What the environment says about the network, read once: which CAs to
trust, which proxy a host is reached through, and the retry budget.

Trust, in order of precedence (the first one set wins and replaces the
others): $REQUESTS_CA_BUNDLE, $CURL_CA_BUNDLE (each a bundle file or a
directory of hashed certificates), $SSL_CERT_FILE and/or $SSL_CERT_DIR,
then the operating system's store (certifi's bundle where the system has
none).
"""

from __future__ import annotations

import ipaddress
import os
import ssl
from dataclasses import dataclass
from urllib.parse import urlsplit

from mountd.errors import ConfigError
from mountd.storage.retry import StoragePolicy, policy

_TRUST_VARIABLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")


@dataclass(frozen=True)
class Settings:
    """What the environment says about the network, compared to tell
    whether a transport made earlier still applies."""

    ca_file: str | None
    ca_dir: str | None
    ca_source: str  # where the trust comes from, for messages
    http_proxy: str | None
    https_proxy: str | None
    no_proxy: str
    retry: StoragePolicy


def settings(environ=None) -> Settings:
    environ = os.environ if environ is None else environ

    def env(name: str) -> str | None:
        value = environ.get(name) or environ.get(name.lower())
        return value.strip() if value and value.strip() else None

    ca_file = ca_dir = None
    source = "the system's certificate store"
    for var in _TRUST_VARIABLES:
        value = environ.get(var)
        if value:
            if os.path.isdir(value):
                ca_dir = value
            elif os.path.isfile(value) and os.access(value, os.R_OK):
                ca_file = value
            else:
                raise ConfigError(f"${var} names {value}, which is not a readable CA bundle file or directory: "
                                  "point it at the bundle of the CA that signs your storage's certificate, or unset it")
            source = f"${var} ({value})"
            break
    else:
        for var in ("SSL_CERT_FILE", "SSL_CERT_DIR"):
            value = environ.get(var)
            if value and not os.path.exists(value):
                raise ConfigError(f"${var} names {value}, which does not exist: point it at your CA bundle "
                                  "(a file, or for $SSL_CERT_DIR a directory of hashed certificates), or unset it")
        if environ.get("SSL_CERT_FILE") or environ.get("SSL_CERT_DIR"):
            ca_file, ca_dir = environ.get("SSL_CERT_FILE") or None, environ.get("SSL_CERT_DIR") or None
            source = " and ".join(f"${v} ({environ[v]})" for v in ("SSL_CERT_FILE", "SSL_CERT_DIR") if environ.get(v))
    return Settings(ca_file, ca_dir, source, env("HTTP_PROXY"), env("HTTPS_PROXY"), env("NO_PROXY") or "",
                    policy(environ))


def tls_context(s: Settings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=s.ca_file, capath=s.ca_dir) if (s.ca_file or s.ca_dir) \
        else ssl.create_default_context()
    if not (s.ca_file or s.ca_dir) and not _system_store_present():
        import certifi  # a container image without ca-certificates: the bundle the SDK used to use
        ctx.load_verify_locations(cafile=certifi.where())
    return ctx


def _system_store_present() -> bool:
    paths = ssl.get_default_verify_paths()
    return bool((paths.cafile and os.path.isfile(paths.cafile))
                or (paths.capath and os.path.isdir(paths.capath) and os.listdir(paths.capath)))


def bare_proxy(proxy: str | None) -> str:
    """A proxy URL without its user info (which may hold a password)."""
    parts = urlsplit(proxy or "")
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def bypassed(host: str, port: int | None, no_proxy: str) -> bool:
    """NO_PROXY as curl and requests read it: '*', host names and domain
    suffixes (with or without a leading dot), IP addresses and CIDR ranges,
    each optionally with ':port'."""
    host = host.lower().strip("[]")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for entry in (e.strip().lower() for e in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, entry_port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if entry_port and entry_port.isdigit() and port is not None and int(entry_port) != port:
            continue
        name = name.strip("[]")
        if address is not None:
            try:
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            except ValueError:
                pass
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False
