"""`mountd run`: the life of one training run on this node.

    validate -> stage downloads -> mount -> run the command -> unmount
    -> upload outputs -> exit with the command's code

Everything that can be checked is checked before anything is touched. Staging
and uploads reuse the transfer layer; mounts are supervised mount workers that
unmount themselves if this process dies.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import SimpleNamespace

from mountd.config.manifest import DataReference, Manifest
from mountd.errors import EXIT_TRANSFER, MountdError, NotFound, UsageError
from mountd.run import child as child_mod
from mountd.run import mount_worker, mounts
from mountd.storage import open_store
from mountd.transfer import download as download_mod
from mountd.transfer import upload as upload_mod
from mountd.transfer.progress import Progress, TransferReport

log = logging.getLogger("mountd.run")

PENDING_UPLOADS = "pending-uploads.json"  # in the work dir: outputs an earlier run could not upload

_REF = re.compile(r"\$\{(AZUREML_DATAREFERENCE_[A-Za-z0-9_]+)\}|\$(AZUREML_DATAREFERENCE_[A-Za-z0-9_]+)")


@dataclass
class RunState:
    manifest: Manifest
    paths: dict[str, str] = field(default_factory=dict)  # reference name -> local path the job sees
    workers: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    staging: dict[str, Progress] = field(default_factory=dict)  # reference name -> its download, live


@dataclass
class Plan:
    """The references sorted by what happens to them."""
    mounts: list[DataReference]
    downloads: list[DataReference]  # including mounts downloaded because FUSE is missing
    uploads: list[DataReference]


def substitute(args: list[str], values: dict[str, str]) -> list[str]:
    """Replace $AZUREML_DATAREFERENCE_x and ${AZUREML_DATAREFERENCE_x} in
    each argument; unknown references are left as written."""
    def repl(m):
        name = m.group(1) or m.group(2)
        return values.get(name, m.group(0))
    return [_REF.sub(repl, a) for a in args]


def check_local_paths(manifest: Manifest, fuse_ok: bool) -> None:
    """Mountpoints must be empty directories (or absent); nothing else may sit
    where a reference's directory goes. Checked before anything changes."""
    for ref in manifest.references.values():
        path = ref.path_on_compute
        if os.path.exists(path) and not os.path.isdir(path):
            raise UsageError(f"data reference {ref.name}: path_on_compute {path} exists and is not a directory")
        if ref.mode == "mount" and fuse_ok and os.path.isdir(path):
            if mounts.is_mounted(path):
                raise UsageError(f"data reference {ref.name}: {path} is already a mountpoint")
            if os.listdir(path):
                raise UsageError(f"data reference {ref.name}: mountpoint {path} is not empty")


def plan(manifest: Manifest) -> Plan:
    """Sort the references, falling back to download for read-only mounts
    where FUSE is unavailable; UsageError (before anything is touched) for
    local paths in the way or a read-write mount without FUSE."""
    refs = list(manifest.references.values())
    fuse_problem = mounts.fuse_problem() if any(r.mode == "mount" for r in refs) else None
    check_local_paths(manifest, fuse_problem is None)
    result = Plan([r for r in refs if r.mode == "mount"], [r for r in refs if r.mode == "download"],
                  [r for r in refs if r.mode == "upload"])
    if fuse_problem and result.mounts:
        rw = [r.name for r in result.mounts if r.read_write]
        if rw:
            raise UsageError(f"data reference {rw[0]} is a read-write mount, and FUSE is not available: {fuse_problem}")
        log.warning("FUSE is not available (%s): mount references are downloaded instead", fuse_problem)
        result.downloads += result.mounts
        result.mounts = []
    return result


def prepare_uploads(state: RunState, refs: list[DataReference]) -> None:
    """Create the directories outputs are written to."""
    for ref in refs:
        os.makedirs(ref.path_on_compute, exist_ok=True)
        state.paths[ref.name] = ref.path_on_compute


def _stage(state: RunState, ref: DataReference) -> None:
    """Download one reference; its path is the directory mirroring
    path_on_datastore, or the file itself when it names a file."""
    with open_store(ref.datastore) as store:
        store.check()
        target = ref.path_on_compute
        prefix = ref.path_on_datastore
        is_file = False
        if prefix:
            try:
                is_file = not store.stat(prefix).is_dir
            except NotFound:
                raise MountdError(f"data reference {ref.name}: {prefix} does not exist in datastore "
                                  f"{ref.datastore.name}") from None
        parent, _, name = prefix.rpartition("/")
        if is_file:  # the file alone, into the target directory
            walk, relative_to, local = prefix, parent, os.path.join(target, name)
        else:  # everything below the directory, mirrored into the target
            walk, relative_to, local = (prefix + "/" if prefix else ""), prefix, target
        progress = Progress(TransferReport("downloaded"), label=ref.name)
        state.staging[ref.name] = progress
        report = download_mod.download(store, target, walk, overwrite=ref.overwrite, relative_to=relative_to,
                                       progress=progress)
        state.paths[ref.name] = local
    log.info("staged %s: %s", ref.name, report.summary())
    _note_failed_files(state, "download", ref, report)


def _note_failed_files(state: RunState, verb: str, ref: DataReference, report) -> bool:
    if not report.failed:
        return False
    first, reason = report.failed[0]
    state.failures.append(f"{verb} {ref.name}: {len(report.failed)} file(s) failed, first {first}: {reason}")
    return True


def stage_downloads(state: RunState, refs: list[DataReference]) -> None:
    if not refs:
        return
    log.info("staging %d download reference(s)", len(refs))
    with ThreadPoolExecutor(min(4, len(refs)), thread_name_prefix="stage") as pool:
        futures = {pool.submit(_stage, state, ref): ref for ref in refs}
        for future, ref in futures.items():
            try:
                future.result()
            except MountdError as e:
                state.failures.append(f"download {ref.name}: {e}")
                log.error("staging %s failed: %s", ref.name, e)


def start_mounts(state: RunState, refs: list[DataReference], log_level: str, debug: bool,
                 log_format: str = "text", log_to_stderr: bool = False) -> None:
    for ref in refs:
        os.makedirs(ref.path_on_compute, exist_ok=True)
        spec = mount_worker.make_spec(ref.datastore, ref.path_on_datastore, ref.path_on_compute,
                                      state.manifest.cache, read_only=not ref.read_write)
        state.workers.append(mounts.start(spec, supervised=True, log_level=log_level, debug=debug,
                                          log_format=log_format, log_to_stderr=log_to_stderr))
        state.paths[ref.name] = ref.path_on_compute
        log.info("mounted %s: %s:%s on %s", ref.name, ref.datastore.name, ref.path_on_datastore or "/",
                 ref.path_on_compute)


def stop_mounts(state: RunState) -> None:
    for worker in reversed(state.workers):
        try:
            mounts.stop(worker.mountpoint, worker=worker)
        except MountdError as e:
            log.warning("%s; detaching it lazily", e)
            try:
                mounts.stop(worker.mountpoint, lazy=True, worker=worker)
            except MountdError as e2:
                log.error("could not unmount %s: %s", worker.mountpoint, e2)
    state.workers.clear()


def upload_outputs(state: RunState, refs: list[DataReference], signals: child_mod.SignalState) -> None:
    pending = []
    for ref in refs:
        if signals.abort_uploads.is_set():
            pending.append(ref)
            continue
        if not os.path.isdir(ref.path_on_compute):
            log.warning("upload %s: %s does not exist; nothing to upload", ref.name, ref.path_on_compute)
            continue
        try:
            with open_store(ref.datastore) as store:
                store.check()
                report = upload_mod.upload_tree(store, ref.path_on_compute, ref.path_on_datastore,
                                                overwrite=ref.overwrite, show_progress=False,
                                                cancel=signals.abort_uploads)
        except MountdError as e:
            state.failures.append(f"upload {ref.name}: {e}")
            log.error("upload of %s failed: %s (the files stay in %s)", ref.name, e, ref.path_on_compute)
            pending.append(ref)
            continue
        log.info("uploaded %s: %s", ref.name, report.summary())
        if _note_failed_files(state, "upload", ref, report):
            pending.append(ref)
    if pending:
        _record_pending(state.manifest, pending)


def _record_pending(manifest: Manifest, refs: list[DataReference]) -> None:
    path = os.path.join(manifest.work_dir, PENDING_UPLOADS)
    body = {"run_id": manifest.run_id, "manifest": manifest.path, "written": time.time(),
            "references": [{"name": r.name, "datastore": r.datastore.name, "path_on_datastore": r.path_on_datastore,
                            "path_on_compute": r.path_on_compute} for r in refs]}
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2)
    os.replace(path + ".tmp", path)
    log.warning("outputs not uploaded are kept locally; recorded in %s", path)


def resume_pending(manifest: Manifest, cancel: threading.Event | None = None) -> list[str]:
    """Upload what an earlier run of this manifest left in WORK_DIR/
    pending-uploads.json, to where that run meant it to go, and drop the
    record; what fails again is recorded again. Returns the failures.
    (A stand-in until the upload journal replaces it.)"""
    path = os.path.join(manifest.work_dir, PENDING_UPLOADS)
    try:
        with open(path, encoding="utf-8") as f:
            entries = json.load(f)["references"]
        entries = [(e["name"], e["path_on_datastore"], os.path.abspath(e["path_on_compute"])) for e in entries]
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("ignoring %s: it cannot be read (%s)", path, e)
        return []
    refs = []
    for name, target, local in entries:
        ref = manifest.references.get(name)
        inside = any(os.path.commonpath([local, root]) == root for root in manifest.allowed_roots)
        if ref is None or ref.mode != "upload" or not inside:
            log.warning("pending upload %s is not an upload reference of %s (or not under its work dir); "
                        "its files stay in %s", name, manifest.path, local)
            continue
        refs.append(dataclasses.replace(ref, path_on_datastore=target, path_on_compute=local))
    os.unlink(path)
    if not refs:
        return []
    log.info("resuming %d upload(s) an earlier run left pending: %s", len(refs), ", ".join(r.name for r in refs))
    state = RunState(manifest)
    upload_outputs(state, refs, SimpleNamespace(abort_uploads=cancel or threading.Event()))
    return state.failures


def run(manifest: Manifest, command: list[str] | None = None, log_level: str = "info", debug: bool = False) -> int:
    command = command or manifest.command
    if not command:
        raise UsageError("no command: give one in the manifest (command:) or after `--`")
    refs = list(manifest.references.values())
    todo = plan(manifest)
    upload_refs = todo.uploads

    state = RunState(manifest)
    signals = child_mod.SignalState()
    signals.install()
    os.makedirs(manifest.work_dir, exist_ok=True)
    code = None
    try:
        prepare_uploads(state, upload_refs)
        stage_downloads(state, todo.downloads)
        if not state.failures:
            start_mounts(state, todo.mounts, log_level, debug)
        if state.failures:
            log.error("not starting the training process: %s", "; ".join(state.failures))
        else:
            env = dict(os.environ)
            env.update(manifest.environment)
            values = {ref.env_name: state.paths[ref.name] for ref in refs if ref.name in state.paths}
            env.update(values)
            env["MOUNTD_RUN_ID"] = manifest.run_id
            argv = substitute(command, values)
            log.info("running: %s", " ".join(argv))
            code = child_mod.run_child(argv, env, None, signals)
            log.info("training process exited with code %d", code)
    except KeyboardInterrupt:
        log.warning("interrupted before the training process started")
        code = 130
    finally:
        stop_mounts(state)
        child_mod.reap_orphans()
        if code is not None and (manifest.upload_when == "always" or code == 0):
            upload_outputs(state, upload_refs, signals)
        elif upload_refs:
            log.info("not uploading outputs (upload_when: %s, exit code %s)", manifest.upload_when, code)
        signals.restore()
    if state.failures:
        for failure in state.failures:
            log.error("failed: %s", failure)
        if code in (0, None):
            return EXIT_TRANSFER
    return code if code is not None else EXIT_TRANSFER
