"""What every section of the manifest parser shares: its state, and the
checks of single fields (booleans, choices, path-like text, system dirs).

The state: the file, the workspace, placeholder values, allowed roots, datastores.

The sections themselves are mixins of `FieldChecks`: references
(manifest_refs), command and environment (manifest_command), and the rest
in manifest.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Callable, Mapping, cast

from mountd.config.datastores import DatastoreConfig
from mountd.config.manifest_source import Source, encodable, kind_of, one_line
from mountd.config.settings import CacheSettings
from mountd.config.workspace import Workspace
from mountd.errors import UsageError
from mountd.errors import shorten as _short
from mountd.paths import is_within

# Directories a run's work dir (or an inline local datastore written to) must
# never be in, unless the workspace lists it in allowed_roots. Any top-level
# /lib* directory counts too.
SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/proc", "/sys", "/dev", "/var/lib", "/var/log",
               "/var/spool", "/var/mail", "/var/db")

TOP_KEYS = ("run_id", "work_dir", "datastores", "data_references", "dataReferences", "command", "environment",
            "pass_environment", "upload_when", "cache", "working_dir")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def expand_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace {name} by values[name]; {{ and }} are literal braces. Any other
    {...} is an error, so that a typo such as {runid} cannot pass silently."""
    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if m.group(1) is None:
            raise UsageError(f"unmatched {token!r} (write {token * 2} for a literal brace)")
        if m.group(1) not in values:
            known = ", ".join("{" + k + "}" for k in values)
            raise UsageError(f"unknown placeholder {_short(token)} (known: {known}; "
                             "write {{ and }} for literal braces)")
        return values[m.group(1)]
    return _PLACEHOLDER.sub(sub, text)


@dataclass(frozen=True)
class Root:
    path: str  # lexical, normalized
    real: str  # symbolic links resolved
    what: str
    strict: bool  # a reference must lie strictly inside (the work and cache dirs)


class FieldChecks:
    """The parse state and the field checks every section of the parser uses."""

    cache: CacheSettings  # the run's cache settings, once read (references check prefetch against them)

    def __init__(self, source: Source, workspace: Workspace, environ: Mapping[str, str]):
        self.src = source
        self.workspace = workspace
        self.environ = environ
        self.values: dict[str, str] = {}  # placeholder values
        self.roots: list[Root] = []
        self.inline: dict[str, DatastoreConfig] = {}
        self.stores: dict[str, DatastoreConfig] = {}
        self.origins: dict[str, tuple] = {}  # reference -> the field that chose its datastore
        self.compute_fields: dict[str, tuple] = {}  # reference -> its path_on_compute field
        self.reals: dict[str, str] = {}  # reference -> path_on_compute, links resolved
        self.working_dir = ""  # the base of relative path_on_compute; "" when that is a system directory
        self.working_dir_base = ""  # the working directory, even a system one (for messages)
        self.working_dir_note = ""

    def _choice(self, path: tuple, value: object, choices: tuple) -> str | None:
        if value is not None and value not in choices:
            raise self.src.error(path, f"must be one of {', '.join(choices)}, got {_short(value)}")
        return cast("str | None", value)  # one of the choices, or None

    def _bool(self, path: tuple, value: object) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.src.error(path, f"must be true or false, got {_short(value)}")
        return value

    def _plain(self, path: tuple, value: object, text: bool = True) -> str:
        """A path-like field: one line of printable text."""
        if not text and not isinstance(value, str):
            raise self.src.error(path, f"must be a string, got {kind_of(value)}")
        result = self.src.text(path, value)
        if CONTROL.search(result) or not encodable(result):
            raise self.src.error(path, "must not contain control characters or unpaired surrogates")
        return result

    def _expand(self, text: str, fail: Callable[[str], UsageError]) -> str:
        try:
            return expand_placeholders(text, self.values)
        except UsageError as e:
            raise fail(str(e)) from None

    def _failer(self, path: tuple) -> Callable[[str], UsageError]:
        return lambda message: self.src.error(path, message)

    def _call(self, path: tuple, fn: Callable, *args, prefixed: bool = False):
        """Run a check from another module, placing its error at `path`
        (unless its message already says where)."""
        try:
            return fn(*args)
        except UsageError as e:
            message = one_line(str(e))
            raise type(e)(message) if prefixed else self.src.error(path, message, type(e)) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise self.src.error(path, f"invalid value: {_short(str(e), bare=True)}") from None

    def _system_dir(self, path: str) -> str | None:
        """The system directory `path` is in (lexically or through links),
        unless the workspace allows it."""
        real = real_path(path)
        for root in self.workspace.allowed_roots:
            root = norm_path(root)
            if is_within(path, root) or is_within(real, real_path(root)):
                return None
        for candidate in (path, real):
            if candidate == "/":
                return "/"
            top = candidate.split("/")[1]
            if top.startswith("lib"):
                return "/" + top
            for system in SYSTEM_DIRS:
                if is_within(candidate, system):
                    return system
        return None


# -- local paths ----------------------------------------------------------------------
def norm_path(path: str) -> str:
    """Normalized absolute path; POSIX keeps a leading '//', we do not."""
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path


def real_path(path: str) -> str:
    """`path` with symbolic links resolved as far as it exists (the rest does
    not exist yet, so it cannot be a link)."""
    head, tail = path, cast(list[str], [])
    while not os.path.lexists(head) and head != "/":
        head, name = os.path.split(head)
        tail.insert(0, name)
    return norm_path(os.path.join(os.path.realpath(head), *tail))
