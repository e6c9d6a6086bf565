"""Pure path helpers, shared by every layer: the canonical form of a datastore
path, joining store paths, and "is this path inside that root".

A leaf: it touches no file and imports nothing of mountd but its error types,
so config, storage, fs and transfer can all use it without importing each other.
"""

from __future__ import annotations

from mountd.errors import UsageError


def normalize_path(path: str | None) -> str:
    """Canonical relative form of a datastore path: no leading/trailing '/',
    no empty, '.' or '..' components ('..' is refused, never resolved)."""
    if not path:
        return ""
    parts = []
    for part in path.replace("\\", "/").split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            raise UsageError(f"path {path!r} must not contain '..'")
        parts.append(part)
    return "/".join(parts)


def join(*parts: str) -> str:
    """Join datastore path components, skipping empty ones."""
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


def is_within(path: str, root: str) -> bool:
    """`path` is `root` or below it. Both in one form, already normalized:
    absolute local paths ('/' holds everything), or store paths ('' is the
    datastore's root and holds everything). A plain string test: resolve
    symbolic links first where they matter."""
    root = root.rstrip("/")
    return not root or path == root or path.startswith(root + "/")
