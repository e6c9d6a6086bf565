"""The errors the filesystem gives applications: FsError carries an errno
(FUSE passes it on), and `errno_for` turns storage and local-disk errors into
the errno an application expects."""

from __future__ import annotations

import errno
import logging
import os
from contextlib import contextmanager

from mountd.errors import AlreadyExists, MountdError, NotEmpty, NotFound

log = logging.getLogger("mountd.fs.core")


class FsError(OSError):
    """An errno for the caller (FUSE passes it to the application)."""

    def __init__(self, code: int, message: str = ""):
        super().__init__(code, message or os.strerror(code))


@contextmanager
def errno_for(what: str):
    """Storage errors as the errno an application expects; anything
    unexpected is logged (as `what: error`) and becomes EIO."""
    try:
        yield
    except FsError:
        raise
    except NotFound:
        raise FsError(errno.ENOENT) from None
    except AlreadyExists:
        raise FsError(errno.EEXIST) from None
    except NotEmpty:
        raise FsError(errno.ENOTEMPTY) from None
    except MountdError as e:
        log.error("%s: %s", what, e)
        raise FsError(errno.EIO) from None
    except OSError as e:  # the staging disk: ENOSPC, EDQUOT, EIO reach the writer as they are
        if e.errno is None:
            raise
        log.error("%s: %s", what, e)
        raise FsError(e.errno) from None
