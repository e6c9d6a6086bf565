"""Cache and mount settings: sizes, durations, their defaults, and the order
in which sources override each other:

    defaults < `cache:` section (workspace or manifest) < data-runtime
    environment variables (DATASET_MOUNT_*) < command-line flags

The environment variables are the ones Azure ML's data runtime reads, so a
job moved from there keeps its tuning.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from typing import Any

from mountd.errors import UsageError

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "ki": KiB, "kib": KiB, "m": 1000 ** 2, "mb": 1000 ** 2,
          "mi": MiB, "mib": MiB, "g": 1000 ** 3, "gb": 1000 ** 3, "gi": GiB, "gib": GiB,
          "t": 1000 ** 4, "tb": 1000 ** 4, "ti": TiB, "tib": TiB}
_SIZE = re.compile(r"\s*(-?\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*")
_SECONDS = {"ms": 0.001, "s": 1, "": 1, "m": 60, "h": 3600}
MAX_SIZE = 1 << 50  # 1 PiB: anything larger is a typo
# Blocks the memory cache must hold: two being read, two queued for the disk
# cache, one being fetched and one cached (mountd.cache.blocks plans them).
MIN_MEMORY_BLOCKS = 6


def parse_size(value: object, what: str, allow_negative: bool = False) -> int:
    """'512MB', '8MiB', '1.5G', 4096 -> bytes (MB = 10^6, MiB = 2^20)."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a size such as 512MiB, got {value!r}")
    number: float
    if isinstance(value, int):
        number, unit = value, ""
    else:
        m = _SIZE.fullmatch(str(value))
        if not m or m.group(2).lower() not in _UNITS:
            raise UsageError(f"{what}: expected a size such as 512MiB or 8MB, got {value!r}")
        number, unit = float(m.group(1)), m.group(2).lower()
    result = int(number * _UNITS[unit])
    if result < 0 and not allow_negative:
        raise UsageError(f"{what}: must not be negative, got {value!r}")
    if abs(result) > MAX_SIZE:
        raise UsageError(f"{what}: {value!r} is too large")
    return result


def parse_duration(value: object, what: str, bare_unit: str = "s") -> float:
    """'120s', '2m', '500ms', 30 -> seconds. A bare number is in `bare_unit`."""
    if isinstance(value, bool):
        raise UsageError(f"{what}: expected a duration such as 120s, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), bare_unit
    else:
        m = _DURATION.fullmatch(str(value))
        if not m:
            raise UsageError(f"{what}: expected a duration such as 120s, 2m or 500ms, got {value!r}")
        number, unit = float(m.group(1)), m.group(2) or bare_unit
    seconds = number * _SECONDS[unit]
    if not 0 <= seconds <= 365 * 86400:  # written this way round so NaN fails too
        raise UsageError(f"{what}: {value!r} is out of range")
    return seconds


def default_cache_dir() -> str:
    if os.geteuid() == 0:
        return "/var/cache/mountd"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return os.path.join(base, "mountd")


@dataclass(frozen=True)
class CacheSettings:
    dir: str = ""  # "" -> default_cache_dir()
    max_size: int = 10 * GiB  # disk tier cap
    reserved_free: int = 1 * GiB  # the disk tier never fills the disk beyond this
    memory: int = 512 * MiB  # memory tier cap: every block buffer the worker holds
    block_size: int = 16 * MiB  # fewer, larger ranged reads: per-request cost dominates below this
    readahead_blocks: int = 8  # most blocks read ahead of one sequential reader
    threads: int = 8  # concurrent requests to storage per mount
    attribute_ttl: float = 120.0  # seconds metadata is trusted
    negative_ttl: float = 30.0  # seconds a name known absent stays absent
    disk: bool = True  # whether the disk tier is used at all
    # the kernel keeps no pages of the mount's files: every read comes to
    # mountd. A single pass over a dataset then costs no page-cache fill (on
    # a VM whose host takes freed memory back, half the mount's CPU on a
    # cold read, measured), and the node's memory for the data is bounded
    # by `memory`; a second epoch comes from mountd's caches, not the kernel's.
    direct_io: bool = False
    # every open of a read-only mount's file comes to mountd, which pins the
    # version it reads for that open and tells the kernel whether its cached
    # pages are still good. Off, the kernel opens and closes files itself
    # (where it can) and a later epoch costs no round trips: the version
    # read is the one the kernel's attributes show (README, consistency).
    strict_open: bool = False

    @property
    def directory(self) -> str:
        return self.dir or default_cache_dir()


# key in a `cache:` mapping -> (field, parser)
_SECTION = {
    "dir": ("dir", lambda v, w: _path(v, w)),
    "max_size": ("max_size", lambda v, w: parse_size(v, w)),
    "reserved_free": ("reserved_free", lambda v, w: parse_size(v, w)),
    "memory": ("memory", lambda v, w: parse_size(v, w)),
    "block_size": ("block_size", lambda v, w: parse_size(v, w)),
    "readahead_blocks": ("readahead_blocks", lambda v, w: parse_count(v, w, 0, 256)),
    "threads": ("threads", lambda v, w: parse_count(v, w, 1, 128)),
    "attribute_ttl": ("attribute_ttl", lambda v, w: parse_duration(v, w)),
    "negative_ttl": ("negative_ttl", lambda v, w: parse_duration(v, w)),
    "disk": ("disk", lambda v, w: _bool(v, w)),
    "direct_io": ("direct_io", lambda v, w: _bool(v, w)),
    "strict_open": ("strict_open", lambda v, w: _bool(v, w)),
}

# Azure ML data-runtime variable -> (field, parser). Bare numbers are bytes,
# and milliseconds for the attribute TTL, as that runtime reads them.
_ENV = {
    "DATASET_MOUNT_CACHE_SIZE": ("max_size", lambda v, w: parse_size(v, w)),
    "DATASET_MOUNT_ATTRIBUTE_CACHE_TTL": ("attribute_ttl", lambda v, w: parse_duration(v, w, bare_unit="ms")),
    "DATASET_MOUNT_READ_BLOCK_SIZE": ("block_size", lambda v, w: parse_size(v, w)),
    "DATASET_MOUNT_READ_THREADS": ("threads", lambda v, w: parse_count(v, w, 1, 128)),
    "DATASET_MOUNT_READ_BUFFER_BLOCK_COUNT": ("readahead_blocks", lambda v, w: parse_count(v, w, 0, 256)),
    "DATASET_MOUNT_MEMORY_CACHE_SIZE": ("memory", lambda v, w: parse_size(v, w)),
    "DATASET_RESERVED_FREE_DISK_SPACE": ("reserved_free", lambda v, w: parse_size(v, w)),
    "RSLEX_DOWNLOADER_THREADS": ("threads", lambda v, w: parse_count(v, w, 1, 128)),
}


def prefetch_problem(read_write: bool, disk: bool) -> str | None:
    """Why a mount cannot prefetch its dataset, or None. The prefetch fills
    the disk cache; a read-write mount's data is what the job writes, and
    it keeps no disk cache of its own writes to fill."""
    if read_write:
        return "is for read-only mounts (a read-write mount holds what the job writes): drop one of the two"
    if not disk:
        return "fills the disk cache, which is turned off (--no-disk-cache, or disk: false): drop one of the two"
    return None


def _path(value, what) -> str:
    if not isinstance(value, str) or not os.path.isabs(os.path.expanduser(value)):
        raise UsageError(f"{what}: expected an absolute directory path, got {value!r}")
    return os.path.expanduser(value)


def parse_count(value, what, low, high) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or not low <= number <= high:
        raise UsageError(f"{what}: expected a whole number from {low} to {high}, got {value!r}")
    return number


def _bool(value, what) -> bool:
    if isinstance(value, bool):
        return value
    raise UsageError(f"{what}: expected true or false, got {value!r}")


def apply_section(base: CacheSettings, section: object, where: str) -> CacheSettings:
    """Overlay a `cache:` mapping from a workspace or manifest."""
    if section is None:
        return base
    if not isinstance(section, dict):
        raise UsageError(f"{where}: cache must be a mapping")
    changes: dict[str, Any] = {}
    for key, value in section.items():
        if key not in _SECTION:
            raise UsageError(f"{where}: unknown cache setting {key!r} (known: {', '.join(sorted(_SECTION))})")
        name, parse = _SECTION[key]
        changes[name] = parse(value, f"{where}: cache.{key}")
    return _checked(replace(base, **changes), where)


def apply_environment(base: CacheSettings, environ=None) -> CacheSettings:
    environ = os.environ if environ is None else environ
    changes: dict[str, Any] = {}
    for var, (name, parse) in _ENV.items():
        value = environ.get(var)
        if value not in (None, ""):
            changes[name] = parse(value, f"${var}")
    return _checked(replace(base, **changes), "environment") if changes else base


def apply_flags(base: CacheSettings, **flags) -> CacheSettings:
    """Overlay command-line values already parsed (None means not given)."""
    changes = {k: v for k, v in flags.items() if v is not None}
    return _checked(replace(base, **changes), "command line") if changes else base


def resolve(section: object = None, where: str = "cache", environ=None, **flags) -> CacheSettings:
    settings = apply_section(CacheSettings(), section, where)
    settings = apply_environment(settings, environ)
    return apply_flags(settings, **flags)


class CombinedSettingsError(UsageError):
    """The settings taken together are refused (the block size's range, the
    memory cache against the block size), not one value as written: a
    reader of one setting at a time waits for the others before judging."""


def _checked(s: CacheSettings, where: str) -> CacheSettings:
    if not 64 * KiB <= s.block_size <= 256 * MiB:
        raise CombinedSettingsError(f"{where}: block size must be between 64KiB and 256MiB, got {s.block_size}")
    if s.memory < MIN_MEMORY_BLOCKS * s.block_size:
        raise CombinedSettingsError(f"{where}: memory cache ({s.memory} bytes) must hold at least {MIN_MEMORY_BLOCKS} "
                         f"blocks of {s.block_size} bytes: raise it or lower the block size")
    return s


SETTING_NAMES = [f.name for f in fields(CacheSettings)]
