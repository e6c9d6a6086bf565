"""Upload journal: what must reach storage, written to disk before the first
byte goes up and forgotten only once storage has confirmed every file.
A durability concern of its own, shared by bulk uploads (`mountd.transfer`)
and read-write mounts (`mountd.fs.writeback`), so neither imports the other for it.

One job per upload (an `upload` reference after the run, a file closed on a
read-write mount), under `<work dir>/journal/`:

    <id>.json   the job: datastore (never a secret), the (local, remote) files,
                empty directories, overwrite; written once, fsynced
    <id>.done   remote paths storage has confirmed, a line each, appended
                (and those dropped: their local file is gone, see `drop`)

A crash loses at most the tail of `.done`; those files are checked again on
resume (an object already holding the same bytes counts as done), never lost.
The local files are never deleted by the journal, except mountd's own staged
copies (`staged: true`), and those only after their upload is confirmed.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Iterable

from mountd.config import credentials
from mountd.config.datastores import DatastoreConfig
from mountd.fileio import write_atomic
from mountd.locks import is_locked

JOURNAL_DIR = "journal"


def datastore_record(cfg: DatastoreConfig, source: dict | None = None) -> dict:
    """The datastore as the journal keeps it: its definition with credential
    references only. An inline secret is left out; resume reads it again from
    `source` (the manifest or workspace the user put it in)."""
    body = {"name": cfg.name, **cfg.to_dict()}
    if credentials.has_inline_secret(cfg.credential):
        body.pop("credential", None)
        body["credential_from"] = dict(source or {})
    return body


@dataclass
class Job:
    id: str
    path: str  # the job file
    datastore: dict
    files: list[tuple[str, str]]  # (local path, remote path)
    dirs: list[str] = field(default_factory=list)
    overwrite: bool = True
    origin: str = ""  # what asked for it, for messages: "upload reference outputs"
    run_id: str | None = None
    staged: bool = False  # local files are mountd's staged copies
    created: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def label(self) -> str:
        """For messages: what asked for it, else its id."""
        return self.origin or self.id

    @property
    def done_path(self) -> str:
        return self.path[:-len(".json")] + ".done"

    def confirmed(self) -> set[str]:
        try:
            with open(self.done_path, encoding="utf-8") as f:
                return {line.rstrip("\n") for line in f if line.endswith("\n")}
        except FileNotFoundError:
            return set()

    def confirm(self, remote: str) -> None:
        """Record that storage holds `remote`. Not fsynced: losing the line
        in a crash costs one re-check on resume, not data."""
        line = (remote + "\n").encode("utf-8")
        with self._lock:
            fd = os.open(self.done_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)

    def drop(self, remote: str) -> None:
        """Give up `remote`: its local file is gone, so no retry can upload
        it, and a job kept for it would fail every resume forever."""
        self.confirm(remote)

    def remaining(self) -> list[tuple[str, str]]:
        done = self.confirmed()
        return [(local, remote) for local, remote in self.files if remote not in done]

    def finish(self, keep_local: bool = False) -> None:
        """Storage holds everything: forget the job, and delete its staged
        copies unless `keep_local` (a live mount still uses them)."""
        if self.staged and not keep_local:
            for local, _ in self.files:
                try:
                    os.unlink(local)
                except FileNotFoundError:
                    pass
        for p in (self.done_path, self.path):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass


class Journal:
    """The jobs of one work directory."""

    def __init__(self, work_dir: str):
        self.dir = os.path.join(os.path.abspath(work_dir), JOURNAL_DIR)

    def add(self, datastore: dict, files: list[tuple[str, str]], dirs: Iterable[str] = (), overwrite: bool = True,
            origin: str = "", run_id: str | None = None, staged: bool = False) -> Job:
        """Record a job durably; returns it. Call before uploading anything."""
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        job_id = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:8]}"
        job = Job(job_id, os.path.join(self.dir, job_id + ".json"), datastore, [(src, dst) for src, dst in files],
                  list(dirs), overwrite, origin, run_id, staged, time.time())
        body = {"id": job.id, "origin": origin, "run_id": run_id, "created": job.created, "staged": staged,
                "overwrite": overwrite, "datastore": datastore, "files": [list(p) for p in job.files],
                "dirs": job.dirs}
        write_atomic(job.path, json.dumps(body, indent=1).encode("utf-8"), durable=True)
        return job

    def has_jobs(self) -> bool:
        """Any unfinished job at all (without reading them)."""
        try:
            return any(n.endswith(".json") for n in os.listdir(self.dir))
        except FileNotFoundError:
            return False

    def pending(self, run_id: str | None = None) -> list[Job]:
        """Unfinished jobs, oldest first; with `run_id`, only that run's."""
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".json"))
        except FileNotFoundError:
            return []
        jobs = []
        for name in names:
            path = os.path.join(self.dir, name)
            try:
                with open(path, encoding="utf-8") as f:
                    body = json.load(f)
            except (OSError, ValueError):
                continue  # written durably, so only a foreign file gets here
            if run_id is not None and body.get("run_id") not in (None, run_id):
                continue
            jobs.append(Job(body["id"], path, body["datastore"], [tuple(p) for p in body["files"]],
                            body.get("dirs", []), body.get("overwrite", True), body.get("origin", ""),
                            body.get("run_id"), body.get("staged", False), body.get("created", 0.0)))
        return jobs


def in_use(job: Job) -> bool:
    """True if a live read-write mount holds the staging directory of this
    job's copies: that mount uploads them itself."""
    return job.staged and bool(job.files) and is_locked(os.path.dirname(job.files[0][0]))
