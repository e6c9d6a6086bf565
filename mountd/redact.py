"""Scrubbing secrets out of any text before it is shown or logged."""

from __future__ import annotations

import logging
import re

_PATTERNS = [
    # SAS signature and connection-string keys
    (re.compile(r"(?i)([?&;]?\bsig=)[^&\s;'\"]+"), r"\1REDACTED"),
    # the same, URL-encoded once (a SAS URL inside another URL's query)
    (re.compile(r"(?i)((?<![a-z])sig%3D)(?:[^&%\s;'\"]|%(?!26)[0-9a-f]{2})+"), r"\1REDACTED"),
    # a secret as a mapping value, as repr() or JSON show a credential spec
    (re.compile(r"""(?i)(['"](?:account_key|sas_token|connection_string|client_secret|password)['"]\s*:\s*['"])"""
                r"""[^'"]+"""), r"\1REDACTED"),
    (re.compile(r"(?i)(AccountKey=)[^;\s'\"]+"), r"\1REDACTED"),
    (re.compile(r"(?i)(SharedAccessSignature=)[^;\s'\"]+"), r"\1REDACTED"),
    (re.compile(r"(?i)(Authorization:?\s*['\"]?\s*(?:SharedKey|Bearer)\s+)[^\s'\",]+"), r"\1REDACTED"),
    # a bare account key: 64 random bytes in base64 (88 characters)
    (re.compile(r"(?<![A-Za-z0-9+/])[A-Za-z0-9+/]{86}==(?![A-Za-z0-9+/=])"), "REDACTED"),
]


def redact(text: str) -> str:
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


class RedactingFilter(logging.Filter):
    """A logging filter that scrubs each record's final message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if record.exc_info:
            import traceback
            clean += "\n" + redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
            record.exc_info = None
            record.exc_text = None
        if clean != message or record.args:
            record.msg, record.args = clean, None
        return True
