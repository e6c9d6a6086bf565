"""Sizes, durations and the order in which cache settings override each other."""

import pytest

from mountd.config import settings as s
from mountd.errors import UsageError


@pytest.mark.parametrize("text, expected", [
    ("512MB", 512_000_000), ("8MiB", 8 << 20), ("1.5G", 1_500_000_000), ("4096", 4096), (4096, 4096),
    ("2 GiB", 2 << 30), ("10kb", 10_000),
])
def test_parse_size(text, expected):
    assert s.parse_size(text, "x") == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1MB", True, "1e3", str(1 << 60)])
def test_parse_size_rejects(text):
    with pytest.raises(UsageError):
        s.parse_size(text, "x")


@pytest.mark.parametrize("text, expected", [("120s", 120), ("2m", 120), ("500ms", 0.5), (30, 30), ("1h", 3600)])
def test_parse_duration(text, expected):
    assert s.parse_duration(text, "x") == expected


@pytest.mark.parametrize("text", ["soon", "-5s", "10d", "", True])
def test_parse_duration_rejects(text):
    with pytest.raises(UsageError):
        s.parse_duration(text, "x")


def test_precedence_section_then_environment_then_flags():
    env = {"DATASET_MOUNT_MEMORY_CACHE_SIZE": "300MiB", "DATASET_MOUNT_ATTRIBUTE_CACHE_TTL": "60000",
           "DATASET_MOUNT_READ_THREADS": "4"}
    got = s.resolve({"memory": "200MiB", "threads": 16, "block_size": "4MiB"}, environ=env, threads=2)
    assert got.memory == 300 << 20  # environment beats the section
    assert got.attribute_ttl == 60.0  # the runtime's bare number is milliseconds
    assert got.threads == 2  # a flag beats everything
    assert got.block_size == 4 << 20  # the section beats the default


@pytest.mark.parametrize("section, fragment", [
    ({"memroy": "1GB"}, "unknown cache setting 'memroy'"),
    ({"block_size": "1KB"}, "block size must be between"),
    ({"memory": "64MiB", "block_size": "16MiB"}, "must hold at least 6 blocks"),
    ({"threads": 0}, "whole number from 1"),
    ({"dir": "relative"}, "absolute directory"),
    ({"disk": "yes"}, "true or false"),
    ({"direct_io": 1}, "true or false"),
    ("big", "cache must be a mapping"),
])
def test_section_errors_name_the_setting(section, fragment):
    with pytest.raises(UsageError) as e:
        s.resolve(section, where="manifest.yaml", environ={})
    assert fragment in str(e.value)


def test_direct_io_is_off_unless_asked_for():
    assert s.resolve(None, environ={}).direct_io is False
    assert s.resolve({"direct_io": True}, environ={}).direct_io is True
    assert s.resolve(None, environ={}, direct_io=True).direct_io is True


def test_strict_open_is_off_unless_asked_for():
    assert s.resolve(None, environ={}).strict_open is False
    assert s.resolve({"strict_open": True}, environ={}).strict_open is True
    assert s.resolve(None, environ={}, strict_open=True).strict_open is True
    with pytest.raises(UsageError):
        s.resolve({"strict_open": "yes"}, environ={})


def test_bad_environment_variable_is_named():
    with pytest.raises(UsageError, match=r"\$DATASET_MOUNT_READ_BLOCK_SIZE"):
        s.resolve(None, environ={"DATASET_MOUNT_READ_BLOCK_SIZE": "huge"})


def test_nan_duration_is_refused():
    with pytest.raises(UsageError):
        s.parse_duration(float("nan"), "x")
