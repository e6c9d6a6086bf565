"""Local directory backend: a datastore that is a directory on this machine.

An entry's etag is derived from inode, mtime and size, so a file replaced or
rewritten between open and read is noticed like a changed blob.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat as statmod
import tempfile
from typing import Iterator

from mountd.errors import AlreadyExists, NotEmpty, NotFound, Stale, StorageError
from mountd.paths import normalize_path
from mountd.storage.base import Entry, NameLimits, ObjectStore, ProgressCallback


def _etag(st: os.stat_result) -> str:
    return f'"{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}"'


def _entry(path: str, st: os.stat_result) -> Entry:
    is_dir = statmod.S_ISDIR(st.st_mode)
    return Entry(path=path, is_dir=is_dir, size=0 if is_dir else st.st_size,
                 mtime=st.st_mtime, etag=None if is_dir else _etag(st), links=st.st_nlink if is_dir else 0)


class LocalStore(ObjectStore):
    def __init__(self, root: str, create: bool = False):
        self.root = os.path.abspath(root)
        self.description = f"local directory {self.root}"
        if create:
            os.makedirs(self.root, exist_ok=True)

    def _full(self, path: str) -> str:
        path = normalize_path(path)
        return os.path.join(self.root, path) if path else self.root

    def _oserror(self, e: OSError, path: str) -> Exception:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):  # ENOTDIR: a parent is a file, so no such path
            return NotFound(f"{path or '/'} does not exist in {self.description}")
        if e.errno == errno.ENOTEMPTY:
            return NotEmpty(f"{path} is not empty in {self.description}")
        if e.errno == errno.EEXIST:
            return AlreadyExists(f"{path} already exists in {self.description}")
        return StorageError(f"{path or '/'} in {self.description}: {e.strerror}")

    def name_limits(self) -> NameLimits:
        """The filesystem under the root: its own longest name (255 bytes on
        ext4, statvfs's f_namemax) and PATH_MAX for the whole path, of which
        the root's own path and the '/' after it take their share."""
        try:
            component = os.statvfs(self.root).f_namemax
            path_max = os.pathconf(self.root, "PC_PATH_MAX")
        except OSError:
            return super().name_limits()
        # PATH_MAX counts the terminating NUL
        return NameLimits(component=component, in_bytes=True,
                          path=path_max - 1 - len(os.fsencode(self.root)) - 1)

    def check(self) -> None:
        if not os.path.isdir(self.root):
            from mountd.errors import ConfigError
            raise ConfigError(f"{self.description} does not exist")

    def stat(self, path: str) -> Entry:
        try:
            return _entry(normalize_path(path), os.stat(self._full(path)))
        except OSError as e:
            raise self._oserror(e, path) from None

    def list_dir(self, path: str) -> Iterator[Entry]:
        path = normalize_path(path)
        try:
            it = os.scandir(self._full(path))
        except OSError as e:
            raise self._oserror(e, path) from None
        with it:
            for de in it:
                try:
                    st = de.stat()
                except OSError:
                    continue  # vanished or a dangling link
                yield _entry(f"{path}/{de.name}" if path else de.name, st)

    def walk(self, prefix: str = "") -> Iterator[Entry]:
        # `prefix` is a plain string prefix: walk from the deepest directory
        # it names and keep what starts with it.
        start = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        try:
            top = normalize_path(start)
        except Exception:
            return
        stack = [top]
        while stack:
            current = stack.pop()
            try:
                entries = sorted(self.list_dir(current), key=lambda e: e.path)
            except NotFound:
                continue
            for entry in entries:
                if entry.is_dir:
                    if entry.path.startswith(prefix) or prefix.startswith(entry.path + "/"):
                        stack.append(entry.path)
                    if entry.path.startswith(prefix):
                        yield entry
                elif entry.path.startswith(prefix):
                    yield entry

    def read_into(self, path: str, offset: int, view: memoryview, etag: str | None = None) -> int:
        try:
            fd = os.open(self._full(path), os.O_RDONLY)
        except OSError as e:
            raise self._oserror(e, path) from None
        try:
            if etag is not None and _etag(os.fstat(fd)) != etag:
                raise Stale(f"{path} changed in {self.description} while it was being read")
            got = 0
            while got < len(view) and (n := os.preadv(fd, [view[got:]], offset + got)):
                got += n
            return got
        except OSError as e:
            raise self._oserror(e, path) from None
        finally:
            os.close(fd)

    def _place(self, path: str, fill, overwrite: bool) -> Entry:
        """Write a new file through `fill(fileobj)` into a temporary name beside
        the target, then rename it into place, so no reader sees half a file."""
        full = self._full(path)
        if not overwrite and os.path.lexists(full):
            raise AlreadyExists(f"{path} already exists in {self.description}")
        try:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".mountd-", dir=os.path.dirname(full))
        except FileExistsError:  # a parent is a file: not "the target exists"
            raise StorageError(f"{path}: a parent directory is a file in {self.description}") from None
        except OSError as e:
            raise self._oserror(e, path) from None
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
            os.chmod(tmp, 0o644)
            if overwrite:
                os.replace(tmp, full)
            else:
                os.link(tmp, full)  # fails if the target appeared meanwhile
                os.unlink(tmp)
        except OSError as e:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise self._oserror(e, path) from None
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        return self.stat(path)

    def write_file(self, path: str, local_path: str, overwrite: bool = True,
                   progress: ProgressCallback | None = None) -> Entry:
        def fill(f):
            with open(local_path, "rb") as src:
                shutil.copyfileobj(src, f, 1024 * 1024)
        entry = self._place(normalize_path(path), fill, overwrite)
        if progress:
            progress(entry.size)
        return entry

    def write_bytes(self, path: str, data: bytes, overwrite: bool = True) -> Entry:
        return self._place(normalize_path(path), lambda f: f.write(data), overwrite)

    def delete(self, path: str) -> None:
        try:
            os.unlink(self._full(path))
        except OSError as e:
            raise self._oserror(e, path) from None

    def mkdir(self, path: str) -> None:
        try:
            os.makedirs(self._full(path), exist_ok=True)
        except OSError as e:
            raise self._oserror(e, path) from None

    def rmdir(self, path: str) -> None:
        try:
            os.rmdir(self._full(path))
        except OSError as e:
            raise self._oserror(e, path) from None

    def rename(self, src: str, dst: str) -> None:
        try:
            os.makedirs(os.path.dirname(self._full(dst)), exist_ok=True)
            os.replace(self._full(src), self._full(dst))
        except OSError as e:
            raise self._oserror(e, src) from None

    def rename_dir(self, src: str, dst: str) -> None:
        """rename(2) moves a directory whole, atomically (see rename)."""
        self.rename(src, dst)
