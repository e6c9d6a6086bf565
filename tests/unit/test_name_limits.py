"""Each store's name limits (ObjectStore.name_limits): what Azure and a local
filesystem refuse, counted as each counts."""

import os

from mountd.storage.base import NameLimits
from mountd.storage.blob import BLOB_NAME_LIMITS
from mountd.storage.fileshare import SHARE_NAME_LIMITS
from mountd.storage.local import LocalStore


def test_blob_names_are_limited_in_characters_and_segments():
    assert not BLOB_NAME_LIMITS.too_long("a" * 1024)
    assert BLOB_NAME_LIMITS.too_long("a" * 1025)
    assert not BLOB_NAME_LIMITS.too_long("é" * 1024)  # characters, not UTF-8 bytes
    assert not BLOB_NAME_LIMITS.too_long("/".join(["d"] * 254))
    assert BLOB_NAME_LIMITS.too_long("/".join(["d"] * 255))


def test_share_names_are_limited_per_name_and_per_path():
    assert not SHARE_NAME_LIMITS.too_long("n" * 255)
    assert SHARE_NAME_LIMITS.too_long("n" * 256)
    assert SHARE_NAME_LIMITS.too_long("d/" + "n" * 256)
    deep = "/".join(["d" * 200] * 10)  # 2 009 characters
    assert not SHARE_NAME_LIMITS.too_long(deep + "/" + "t" * 38)  # 2 048
    assert SHARE_NAME_LIMITS.too_long(deep + "/" + "t" * 39)


def test_a_local_store_takes_its_filesystems_limits(tmp_path):
    limits = LocalStore(str(tmp_path)).name_limits()
    assert limits.in_bytes and limits.component == os.statvfs(tmp_path).f_namemax
    assert limits.path == 4096 - 1 - len(str(tmp_path)) - 1
    assert limits.too_long("é" * (limits.component // 2 + 1))  # 2 bytes each
    (tmp_path / ("x" * limits.component)).write_bytes(b"")  # the longest it allows is allowed


def test_limits_count_each_component():
    limits = NameLimits(component=3, path=10)
    assert not limits.too_long("abc/def")
    assert limits.too_long("abcd/e")
    assert limits.too_long("abc/def/ghi")  # 11 > 10
