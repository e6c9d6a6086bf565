"""Logging for the command line: one line per event on stderr, secrets
scrubbed from every record (journald adds the time under systemd)."""

from __future__ import annotations

import json
import logging
import sys

from mountd.redact import RedactingFilter


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps({"level": record.levelname.lower(), "logger": record.name,
                           "message": record.getMessage()}, ensure_ascii=False)


def setup(level: str = "warning", debug: bool = False, fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("mountd: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else getattr(logging, level.upper()))
    # The SDK logs every request at INFO; only its warnings are ours to show.
    for noisy in ("azure", "urllib3", "msal"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
    # A failed token request is reported by mountd.storage.identity, once, as
    # a retry or an error naming the datastore; azure-identity's own warnings
    # (several lines for a credential chain) would say it again.
    logging.getLogger("azure.identity").setLevel(logging.DEBUG if debug else logging.ERROR)
    logging.captureWarnings(True)


def _lowercase_levels() -> None:
    for level in (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL):
        logging.addLevelName(level, logging.getLevelName(level).lower())


_lowercase_levels()
