"""Error types and exit codes shared by every layer, and how a library's
error is shown in one line.

Each error carries the exit code the command line returns for it, so the CLI
can turn any of them into one `mountd: error: ...` line without knowing where
it came from.
"""

from mountd.redact import redact

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure (a bug, or the operating system refused)
EXIT_USAGE = 2  # bad input: arguments, workspace, manifest, credentials, endpoint
EXIT_TRANSFER = 3  # input was fine but some data did not reach its destination


def shorten(value: object, limit: int = 60, bare: bool = False) -> str:
    """A value for a message: its repr (or itself, when `bare` and a
    string), cut at `limit` characters so a huge value cannot make a huge
    error line."""
    text = value if bare and isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def first_line(error: BaseException) -> str:
    """An error from a library for a one-line message: the first line of its
    text (its type's name if it has none), at most 300 characters, scrubbed
    of secrets. For showing only: what an error is, is decided by its type."""
    lines = str(error).strip().splitlines()
    return redact(lines[0][:300]) if lines else type(error).__name__


class MountdError(Exception):
    """An error with a message fit to show the user as is."""

    exit_code = EXIT_FAILURE
    request_id: str | None = None  # storage's x-ms-client-request-id, when the error came from an answer


class UsageError(MountdError):
    """Bad input: nothing was touched; exit 2."""

    exit_code = EXIT_USAGE


class ConfigError(UsageError):
    """A workspace, datastore or credential definition is wrong or unusable."""


class StorageError(MountdError):
    """Storage answered with an error that retrying will not fix."""


class NotFound(StorageError):
    """The object or directory does not exist."""


class AlreadyExists(StorageError):
    """The target exists and the operation was asked not to overwrite it."""


class Stale(StorageError):
    """The object changed since it was opened (its etag no longer matches)."""


class NotEmpty(StorageError):
    """A directory to delete still has entries."""


class Unreachable(ConfigError):
    """The storage endpoint does not answer or refuses the credentials."""


class TokenUnavailable(StorageError):
    """The identity's token endpoint kept failing (retries spent): storage
    cannot be reached for now, though nothing is wrong with the input, so a
    mount answers EIO and a transfer exits 3."""

    exit_code = EXIT_TRANSFER


class TransferFailed(MountdError):
    """Some files of a bulk transfer failed; the rest completed."""

    exit_code = EXIT_TRANSFER
