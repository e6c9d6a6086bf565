"""Finishing the uploads of an interrupted run: each unfinished job of a work
directory's journal uploaded again from its local files, then forgotten.

Run by `mountd resume`, and by `mountd run`, the daemon and read-write mount
workers when they start; a job is forgotten once storage confirms it."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass, field

from mountd.config import datastores
from mountd.config.datastores import DatastoreConfig
from mountd.errors import ConfigError, MountdError
from mountd.journal import Job, Journal, in_use
from mountd.transfer.progress import human_size

log = logging.getLogger(__name__)


@dataclass
class ResumeReport:
    jobs: int = 0  # jobs found unfinished
    finished: int = 0  # jobs now complete in storage
    files: int = 0  # files uploaded or confirmed now
    bytes: int = 0
    # (local file or job, reason); a dropped file is a failure too, of the
    # resume that drops it only (its data never reaches storage)
    failed: list[tuple[str, str]] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # remote paths given up: their local file is gone

    def summary(self) -> str:
        if not self.jobs:
            return "no pending uploads"
        line = (f"resumed {self.jobs} pending upload job(s): {self.finished} finished, "
                f"{self.files} file(s) ({human_size(self.bytes)}) uploaded")
        if self.dropped:
            line += f"; {len(self.dropped)} dropped (local file gone)"
        if len(self.failed) > len(self.dropped):
            line += f"; {len(self.failed) - len(self.dropped)} failed (local files kept)"
        return line


def job_datastore(job: Job) -> DatastoreConfig:
    """The datastore a job uploads to. A credential the journal could not keep
    (inline in a manifest or workspace) is read again from that file."""
    body = dict(job.datastore)
    name = body.pop("name")
    source = body.pop("credential_from", None)
    if source is None:
        return datastores.parse(name, body, f"journal {job.path}")
    from mountd.config.workspace import Workspace
    # the run's workspace, as it was then (it may have been the absent default)
    workspace = Workspace.load(source.get("workspace"), missing_ok=True)
    if source.get("manifest"):
        from mountd.config.manifest import load_manifest
        try:
            manifest = load_manifest(source["manifest"], workspace)
        except MountdError as e:
            raise ConfigError(f"journal {job.path}: the credential of datastore {name} is in "
                              f"{source['manifest']}, which cannot be read now: {e}") from None
        for ref in manifest.references.values():
            if ref.datastore.name.lower() == name.lower():
                return ref.datastore
    return workspace.get(name)


def resume(work_dir: str, run_id: str | None = None, show_progress: bool = False,
           cancel: threading.Event | None = None) -> ResumeReport:
    """Upload what the journal of `work_dir` still holds; with `run_id`, only
    that run's jobs. Local files stay wherever a job is not finished;
    setting `cancel` stops files not yet started."""
    from mountd.storage import open_store
    from mountd.transfer.upload import DEFAULT_WORKERS, upload

    report = ResumeReport()
    for job in Journal(work_dir).pending(run_id):
        if in_use(job):
            log.info("%s: left to the read-write mount that holds it", job.label)
            continue
        report.jobs += 1
        todo = job.remaining()
        missing = [(local, remote) for local, remote in todo if not os.path.isfile(local)]
        if missing:
            # Nothing can upload these any more: dropped, or every resume to
            # come would fail on them.
            for _, remote in missing:
                job.drop(remote)
            report.dropped.extend(remote for _, remote in missing)
            report.failed.extend((local, "local file is gone; dropped, nothing can upload it") for local, _ in missing)
            log.warning("%s: dropped %d file(s) whose local copy is gone, so they cannot be uploaded: %s",
                        job.label, len(missing), ", ".join(f"{remote} ({local})" for local, remote in missing))
            todo = [pair for pair in todo if pair not in missing]
            if not todo and not job.dirs:
                job.finish()
                report.finished += 1
                continue
        try:
            cfg = job_datastore(job)
            with open_store(cfg) as store:
                store.check()
                result = upload(store, todo, overwrite=job.overwrite, workers=DEFAULT_WORKERS,
                                show_progress=show_progress, empty_dirs=job.dirs,
                                job=job, label=job.origin or None, cancel=cancel)
        except MountdError as e:
            report.failed.append((job.label, str(e)))
            log.error("%s: could not resume: %s (local files kept; the job stays in %s)",
                      job.label, e, job.path)
            continue
        report.files += result.files + result.skipped
        report.bytes += result.bytes
        report.failed.extend(result.failed)
        if not os.path.exists(job.path):
            report.finished += 1
            log.info("%s: pending upload finished (%s)", job.label, result.summary())
        elif result.failed:
            first, reason = result.failed[0]
            log.error("%s: %d file(s) still not uploaded, first %s: %s (local files kept; the job stays in %s)",
                      job.label, len(result.failed), first, reason, job.path)
    return report
