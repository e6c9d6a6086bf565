"""What stat(2) and statfs(2) say about a mount's files and directories: mode,
links, size and times from storage's entries and from staged copies.

Storage keeps no permissions and blob no directory times, so modes are the
mount's and a directory's times include the changes this mount made in it.
"""

from __future__ import annotations

import os
import stat
import time

from mountd.fs.writeback import StagedFile
from mountd.storage.base import Entry, NameLimits


class Attributes:
    """Attributes for the entries of one mount."""

    def __init__(self, read_only: bool, uid: int, gid: int, block_size: int):
        self.read_only = read_only
        self.uid, self.gid = uid, gid
        self.block_size = block_size
        self.started = time.time()
        # directory (store path) -> when this mount last added, removed or
        # renamed a name in it (ns). Storage cannot say: a created file
        # reaches it only at close, and blob has no directory times at all.
        # A directory shows the later of this and storage's time.
        self._dir_changed: dict[str, int] = {}

    def changed_dir_of(self, *store_paths: str) -> None:
        """The parent directories of `store_paths` changed now: their mtime
        and ctime say so (POSIX stamps a directory on create, delete, rename)."""
        now = time.time_ns()
        for p in store_paths:
            self._dir_changed[p.rpartition("/")[0]] = now

    def of(self, entry: Entry) -> dict:
        mode_bits = 0o555 if self.read_only else 0o755
        if entry.is_dir:
            # 2 + subdirectories where storage counts them (local); else 2:
            # counting would cost a listing of every directory stat'ed
            mode, nlink, size = stat.S_IFDIR | mode_bits, entry.links or 2, 4096
        else:
            mode, nlink, size = stat.S_IFREG | (mode_bits & 0o666 if self.read_only else 0o644), 1, entry.size
        mtime_ns = int((entry.mtime or self.started) * 1e9)
        if entry.is_dir:
            mtime_ns = max(mtime_ns, self._dir_changed.get(entry.path, 0))
        return {"st_mode": mode, "st_nlink": nlink, "st_size": size, "st_uid": self.uid, "st_gid": self.gid,
                "st_mtime": mtime_ns, "st_ctime": mtime_ns, "st_atime": mtime_ns,
                "st_blocks": (size + 511) // 512, "st_blksize": self.block_size}

    def of_staged(self, sf: StagedFile) -> dict:
        """A staged copy's: its size and modification time are the copy's."""
        st = os.fstat(sf.fd)
        attrs = self.of(Entry(sf.path, False, st.st_size, st.st_mtime))
        attrs["st_mtime"] = attrs["st_ctime"] = attrs["st_atime"] = st.st_mtime_ns
        return attrs


def statfs(limits: NameLimits) -> dict:
    """Object storage has no fixed size: a large, honest-looking capacity, so
    that tools checking free space before writing do not refuse."""
    block = 4096
    total = 1 << 50
    return {"f_bsize": block, "f_frsize": block, "f_blocks": total // block, "f_bfree": total // block,
            "f_bavail": total // block, "f_files": 1 << 32, "f_ffree": 1 << 32, "f_namemax": limits.component}
