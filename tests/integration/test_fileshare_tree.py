"""An awkward tree made in a file share through the real SDK (names of
every kind, deep nesting, empty directories and files, sizes across the 4 MiB
range and 16 MiB block boundaries, a directory longer than a listing page)
comes out byte for byte through `mountd download` and through a read-only
mount."""

import hashlib
import os
import subprocess

import pytest
import yaml
from azure.storage.fileshare import ShareServiceClient

from mountd.run import mounts
from tests.conftest import KEY, KEY_ENV, SHARE_PAGE_LIMIT
from tests.support.remotes import share_workspace_entry

MIB = 1024 * 1024
RANGE, BLOCK = 4 * MIB, 16 * MIB


def pattern(size: int, seed: str) -> bytes:
    """Bytes that differ at every offset, so a shifted or misplaced range shows."""
    block = hashlib.sha256(seed.encode()).digest()
    counter = bytes(range(256)) * 4
    unit = bytes(a ^ b for a, b in zip(block * 32, counter))
    return (unit * (size // len(unit) + 1))[:size]


FILES = {
    "zero.bin": b"",
    "with space/file name.txt": b"space",
    "with space/empty.txt": b"",
    "unicode/é日本/データ ü.bin": pattern(3000, "u"),
    "punct/100% #1 +a=b &c 'q' (x) [y] {z} ~.txt": b"punct",
    "dots./end.": b"trailing dots are kept",
    "deep/1/2/3/4/5/6/7/8/9/10/11/12/leaf.txt": b"deep",
    "sizes/range-1.bin": pattern(RANGE - 1, "a"),
    "sizes/range.bin": pattern(RANGE, "b"),
    "sizes/range+1.bin": pattern(RANGE + 1, "c"),
    "sizes/block+range+3.bin": pattern(BLOCK + RANGE + 3, "d"),
    "sizes/2blocks-1.bin": pattern(2 * BLOCK - 1, "e"),
}
MANY = {f"many/f{i:04d}.txt": f"file {i}".encode() for i in range(SHARE_PAGE_LIMIT + 60)}
EMPTY_DIRS = ["empty", "deep/1/2/empty inside", "unicode/é日本/leer"]


@pytest.fixture
def awkward_share(fileshare, share):
    """The share, filled through the SDK alone."""
    client = ShareServiceClient.from_connection_string(fileshare.connection_string, allow_trailing_dot=True,
                                                       max_range_size=RANGE).get_share_client(share.share_name)
    made = set()

    def mkdirs(path):
        parts = path.split("/") if path else []
        for i in range(1, len(parts) + 1):
            sub = "/".join(parts[:i])
            if sub not in made:
                client.get_directory_client(sub).create_directory()
                made.add(sub)

    for name, data in {**FILES, **MANY}.items():
        mkdirs(os.path.dirname(name))
        client.get_file_client(name).upload_file(data, max_concurrency=4)
    for d in EMPTY_DIRS:
        mkdirs(d)
    return share


def tree(root):
    files, dirs = {}, set()
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            dirs.add(os.path.relpath(os.path.join(dirpath, d), root))
        for f in filenames:
            full = os.path.join(dirpath, f)
            with open(full, "rb") as fh:
                files[os.path.relpath(full, root)] = fh.read()
    return files, dirs


def expected_dirs():
    out = set()
    for name in [*FILES, *MANY, *(d + "/x" for d in EMPTY_DIRS)]:
        parts = name.split("/")[:-1]
        out.update("/".join(parts[:i]) for i in range(1, len(parts) + 1))
    return out


@pytest.mark.fuse
def test_awkward_tree_downloads_and_mounts_byte_for_byte(awkward_share, fileshare, tmp_path, mountd_cli):
    ws = tmp_path / "ws.yaml"
    ws.write_text(yaml.safe_dump({"datastores": {"files": share_workspace_entry(fileshare, awkward_share.share_name,
                                                                                 KEY_ENV)}}))
    env = {"MOUNTD_WORKSPACE": str(ws), KEY_ENV: KEY}
    want = {**FILES, **MANY}

    down = mountd_cli("download", "files", tmp_path / "dl", env=env, timeout=300)
    assert down.code == 0, down
    files, dirs = tree(tmp_path / "dl")
    assert files.keys() == want.keys()
    assert all(files[name] == data for name, data in want.items())
    assert dirs == expected_dirs()

    problem = mounts.fuse_problem()
    if problem:
        pytest.skip(problem)
    mp = tmp_path / "mnt"
    mp.mkdir()
    r = mountd_cli("mount", "files", mp, "--cache-dir", tmp_path / "cache", env=env)
    assert r.code == 0, r
    try:
        files, dirs = tree(mp)
        assert files.keys() == want.keys()
        assert all(files[name] == data for name, data in want.items())
        assert dirs == expected_dirs()
        assert os.listdir(mp / "empty") == [] and os.path.getsize(mp / "zero.bin") == 0
        # reads across the range and block boundaries, at odd offsets
        data = FILES["sizes/block+range+3.bin"]
        with open(mp / "sizes" / "block+range+3.bin", "rb") as f:
            for offset in (RANGE - 5, BLOCK - 7, BLOCK + RANGE - 1, len(data) - 2):
                f.seek(offset)
                assert f.read(MIB) == data[offset:offset + MIB], offset
    finally:
        assert mountd_cli("unmount", mp, env=env).code == 0
        if mounts.is_mounted(str(mp)):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)
