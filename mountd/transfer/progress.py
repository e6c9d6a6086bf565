"""Progress of a bulk transfer: a bar on a terminal, one summary line otherwise.

Totals grow while the listing streams in, so a transfer starts moving bytes
before the listing of a large prefix has finished.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field


def human_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass
class TransferReport:
    """What a transfer did; `failed` holds (name, reason) pairs."""

    verb: str  # "downloaded" | "uploaded"
    files: int = 0
    bytes: int = 0
    skipped: int = 0
    directories: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    # skipped because storage holds a different version (uploads without overwrite)
    differing: list[str] = field(default_factory=list)

    def first_differing(self, count: int = 3) -> str:
        names = sorted(self.differing)
        return ", ".join(names[:count]) + (f" and {len(names) - count} more" if len(names) > count else "")

    def summary(self) -> str:
        rate = self.bytes / self.seconds if self.seconds > 0 else 0.0
        line = (f"{self.verb} {self.files} file{'s' if self.files != 1 else ''} "
                f"({human_size(self.bytes)}) in {self.seconds:.1f} s ({human_size(rate)}/s)")
        if self.skipped and not self.differing:
            line += f"; skipped {self.skipped} existing or unchanged (--overwrite replaces changed ones)"
        elif self.skipped:
            same = self.skipped - len(self.differing)
            if same:
                line += f"; skipped {same} existing and unchanged"
            if self.differing:
                line += (f"; NOT uploaded {len(self.differing)} that storage holds in a different version "
                         f"({self.first_differing()}; overwrite replaces them)")
        if self.failed:
            line += f"; {len(self.failed)} failed"
        return line

    def outcome(self, target: str) -> str:
        """The upload in one phrase, for a run's last line: what went to
        `target`, what was unchanged, what did not go and why."""
        line = f"{self.files} file{'s' if self.files != 1 else ''} ({human_size(self.bytes)}) to {target}"
        same = self.skipped - len(self.differing)
        if same:
            line += f", {same} unchanged"
        if self.differing:
            line += f", {len(self.differing)} NOT uploaded (storage holds another version)"
        if self.failed:
            line += f", {len(self.failed)} FAILED"
        return line


class Progress:
    """Thread-safe counters shown as a tqdm bar when `stream` is a terminal."""

    def __init__(self, report: TransferReport, enabled: bool = True, stream=None, label: str | None = None):
        self.report = report
        self.stream = stream or sys.stderr
        self._lock = threading.Lock()
        self._start = time.monotonic()
        self._total_files = 0
        self.total_bytes = 0  # both grow as the listing streams in
        self._bar = None
        if enabled and hasattr(self.stream, "isatty") and self.stream.isatty():
            from tqdm import tqdm
            self._bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024,
                             desc=label or report.verb.capitalize(), file=self.stream, dynamic_ncols=True,
                             leave=False)

    @property
    def total_files(self) -> int:
        return self._total_files

    def add_total(self, nbytes: int) -> None:
        with self._lock:
            self._total_files += 1
            self.total_bytes += nbytes
            if self._bar is not None:
                self._bar.total = (self._bar.total or 0) + nbytes  # made with total=0: never None
                self._bar.refresh()

    def bytes_moved(self, nbytes: int) -> None:
        with self._lock:
            self.report.bytes += nbytes
            if self._bar is not None:
                self._bar.update(nbytes)

    def file_done(self) -> None:
        with self._lock:
            self.report.files += 1
            if self._bar is not None:
                self._bar.set_postfix_str(f"{self.report.files}/{self._total_files} files", refresh=False)

    def skipped(self, differing: str | None = None) -> None:
        """A file not transferred because the target exists; `differing`
        names it when the target is a different version."""
        with self._lock:
            self.report.skipped += 1
            if differing is not None:
                self.report.differing.append(differing)

    def failed(self, name: str, reason: str) -> None:
        with self._lock:
            self.report.failed.append((name, reason))

    def close(self) -> TransferReport:
        self.report.seconds = time.monotonic() - self._start
        if self._bar is not None:
            self._bar.close()
        return self.report
