"""The naming rule for datastores (and data references): letters, digits, '_'."""

import re

from mountd.errors import UsageError

_NAME = re.compile(r"[A-Za-z0-9_]+")
MAX_NAME_LENGTH = 255


def check_name(name: object, what: str = "datastore name") -> str:
    """Return `name` if it follows the rule, else raise UsageError naming it."""
    if not isinstance(name, str) or not name:
        raise UsageError(f"{what} must be a non-empty string, got {name!r}")
    if len(name) > MAX_NAME_LENGTH:
        raise UsageError(f"{what} {name[:40]!r}... is longer than {MAX_NAME_LENGTH} characters")
    if not _NAME.fullmatch(name):
        raise UsageError(f"invalid {what} {name!r}: use only letters, digits and '_'")
    return name
