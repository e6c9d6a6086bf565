"""`mountd run`: the life of one training run on this node.

    validate -> stage downloads -> mount -> run the command -> unmount
    -> upload outputs -> exit with the command's code

Everything that can be checked is checked before anything is touched. Staging
and uploads reuse the transfer layer; mounts are supervised mount workers that
unmount themselves if this process dies.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from mountd.config.manifest import DataReference, Manifest
from mountd.errors import EXIT_TRANSFER, MountdError, NotFound, UsageError
from mountd.journal import Journal, datastore_record
from mountd.run import child as child_mod
from mountd.run import mount_worker, mounts
from mountd.run.signals import FORWARDED, StopSignals
from mountd.storage import open_store
from mountd.transfer import download as download_mod
from mountd.transfer import upload as upload_mod
from mountd.transfer.progress import Progress, TransferReport
from mountd.transfer.resume import resume

log = logging.getLogger("mountd.run")


_REF = re.compile(r"\$\{(AZUREML_DATAREFERENCE_[A-Za-z0-9_]+)\}|\$(AZUREML_DATAREFERENCE_[A-Za-z0-9_]+)")


@dataclass
class RunState:
    manifest: Manifest
    paths: dict[str, str] = field(default_factory=dict)  # reference name -> local path the job sees
    workers: list = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    staging: dict[str, Progress] = field(default_factory=dict)  # reference name -> its download, live
    outputs: dict[str, str] = field(default_factory=dict)  # upload reference name -> what became of it
    # staging threads report failures while a daemon's control thread reads them
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def fail(self, line: str) -> None:
        """Record a failed step (one line); any thread."""
        with self._lock:
            self.failures.append(line)

    def failed(self) -> list[str]:
        """The failures so far, a copy; any thread."""
        with self._lock:
            return list(self.failures)


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


def check_references_named(args: list[str], manifest: Manifest) -> None:
    """UsageError for a $AZUREML_DATAREFERENCE_x in the command that names no
    data reference of the manifest: passed through unchanged, the script
    would get a literal '$AZUREML_DATAREFERENCE_x' for a path."""
    import difflib
    known = sorted(ref.env_name for ref in manifest.references.values())
    for arg in args:
        for m in _REF.finditer(arg):
            name = m.group(1) or m.group(2)
            if name in known:
                continue
            # compared on the part after the common prefix, which would make every name look close
            tails = {k[len("AZUREML_DATAREFERENCE_"):]: k for k in known}
            close = difflib.get_close_matches(name[len("AZUREML_DATAREFERENCE_"):], list(tails), n=1, cutoff=0.6)
            hint = (f"did you mean ${tails[close[0]]}?" if close else
                    f"the manifest's references are {', '.join('$' + k for k in known)}" if known else
                    "the manifest has no data references")
            raise UsageError(f"the command names ${name}, which is no data reference of the manifest: {hint}")


def child_environment(manifest: Manifest, environ) -> dict[str, str]:
    """The training process's environment: mountd's own without the
    variables that hold datastore secrets (unless the manifest lists them
    under pass_environment), then the manifest's `environment`. Logs the
    names withheld, never their values."""
    passed = set(manifest.pass_environment) | set(manifest.environment)
    withheld = sorted(name for name in manifest.secret_variables if name in environ and name not in passed)
    if withheld:
        log.info("not passed to the training process, as they hold datastore credentials: %s "
                 "(list a variable under pass_environment in the manifest to pass it on)", ", ".join(withheld))
    env = {name: value for name, value in environ.items() if name not in withheld}
    env.update(manifest.environment)
    return env


def check_local_paths(manifest: Manifest, fuse_ok: bool) -> None:
    """Mountpoints must be empty directories (or absent); nothing else may sit
    where a reference's directory goes. Checked before anything changes."""
    for ref in manifest.references.values():
        path = ref.path_on_compute
        if os.path.exists(path) and not os.path.isdir(path) and ref.mode != "upload":
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


def upload_is_file(ref: DataReference) -> bool:
    """An upload reference names one file (the seed's `./bar.pkl`) when a file
    is there, or, before the command ran, when its last part has a suffix."""
    path = ref.path_on_compute
    if os.path.lexists(path):
        return not os.path.isdir(path)
    stem, suffix = os.path.splitext(os.path.basename(path))
    return bool(stem and suffix)


def prepare_uploads(state: RunState, refs: list[DataReference]) -> None:
    """Create the directories outputs are written to (for a file, the
    directory it goes in)."""
    for ref in refs:
        os.makedirs(os.path.dirname(ref.path_on_compute) if upload_is_file(ref) else ref.path_on_compute,
                    exist_ok=True)
        state.paths[ref.name] = ref.path_on_compute


def _plan_upload(ref: DataReference) -> tuple[list, list, list]:
    """(files, empty directories, refused) of one upload reference. A file
    goes to path_on_datastore when that ends in its name, else under it."""
    path = ref.path_on_compute
    if os.path.isdir(path):
        return upload_mod.plan_tree(path, ref.path_on_datastore)
    name = os.path.basename(path)
    target = ref.path_on_datastore
    if target.rpartition("/")[2] != name:
        target = f"{target}/{name}" if target else name
    # as for a tree: a link is followed only within the directory it is in
    if os.path.islink(path) and not upload_mod._is_inside(path, os.path.dirname(path)):
        return [], [], [(path, "symbolic link points outside its directory")]
    return [(path, target)], [], []


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
    state.fail(f"{verb} {ref.name}: {len(report.failed)} file(s) failed, first {first}: {reason}")
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
                state.fail(f"download {ref.name}: {e}")
                log.error("staging %s failed: %s", ref.name, e)


def start_mounts(state: RunState, refs: list[DataReference], log_level: str, debug: bool,
                 log_format: str = "text", log_to_stderr: bool = False) -> None:
    for ref in refs:
        os.makedirs(ref.path_on_compute, exist_ok=True)
        spec = mount_worker.make_spec(ref.datastore, ref.path_on_datastore, ref.path_on_compute,
                                      state.manifest.cache, read_only=not ref.read_write,
                                      work_dir=rw_mount_dir(state.manifest, ref),
                                      credential_source=credential_source(state.manifest), prefetch=ref.prefetch)
        state.workers.append(mounts.start(spec, supervised=True, log_level=log_level, debug=debug,
                                          log_format=log_format, log_to_stderr=log_to_stderr))
        state.paths[ref.name] = ref.path_on_compute
        log.info("mounted %s: %s:%s on %s", ref.name, ref.datastore.name, ref.path_on_datastore or "/",
                 ref.path_on_compute)


def stop_mounts(state: RunState) -> None:
    """Unmount every mount; files a read-write mount could not upload are
    failures of the run (their journal jobs stay for `mountd resume`)."""
    for worker in reversed(state.workers):
        try:
            left = mounts.stop(worker.mountpoint, worker=worker)
            if left:
                state.fail(f"mount {worker.mountpoint}: {len(left)} written file(s) not uploaded "
                                      f"({', '.join(left)}); `mountd resume` uploads them")
        except MountdError as e:
            log.warning("%s; detaching it lazily", e)
            try:
                mounts.stop(worker.mountpoint, lazy=True, worker=worker)
            except MountdError as e2:
                log.error("could not unmount %s: %s", worker.mountpoint, e2)
    state.workers.clear()


RW_MOUNTS_DIR = "read-write-mounts"  # under a run's work dir: one work dir per read-write mount


def rw_mount_dir(manifest: Manifest, ref: DataReference) -> str:
    return os.path.join(manifest.work_dir, RW_MOUNTS_DIR, ref.name)


def credential_source(manifest: Manifest) -> dict:
    """Where a datastore's credential can be read again (for the journal)."""
    return {"manifest": manifest.path, "workspace": manifest.workspace_path}


def upload_outputs(state: RunState, refs: list[DataReference], signals: StopSignals) -> None:
    """Upload each `upload` reference, journaled: the job is on disk before the
    first byte goes up and leaves it only once storage holds every file."""
    manifest = state.manifest
    journal = Journal(manifest.work_dir)
    for ref in refs:
        if not os.path.isdir(ref.path_on_compute) and not os.path.isfile(ref.path_on_compute):
            log.warning("upload %s: %s does not exist; nothing to upload", ref.name,
                        os.path.abspath(ref.path_on_compute))
            state.outputs[ref.name] = f"nothing ({os.path.abspath(ref.path_on_compute)} does not exist)"
            continue
        try:
            files, empty_dirs, refused = _plan_upload(ref)
            if not files and not empty_dirs and not refused:
                log.warning("upload %s: %s is empty; nothing to upload (did the command write its outputs "
                            "elsewhere?)", ref.name, os.path.abspath(ref.path_on_compute))
            job = journal.add(datastore_record(ref.datastore, credential_source(manifest)), files, empty_dirs,
                              ref.overwrite, origin=f"upload reference {ref.name}", run_id=manifest.run_id)
            if signals.abort_uploads.is_set():
                state.fail(f"upload {ref.name}: aborted; {len(files)} file(s) pending")
                state.outputs[ref.name] = f"aborted, {len(files)} file(s) kept in {ref.path_on_compute}"
                continue
            with open_store(ref.datastore) as store:
                store.check()
                # a bar per reference on a terminal, as staging shows for downloads
                report = upload_mod.upload(store, job.remaining(), ref.overwrite, show_progress=True,
                                           empty_dirs=empty_dirs, refused=refused, cancel=signals.abort_uploads,
                                           job=job, label=ref.name)
        except MountdError as e:
            state.fail(f"upload {ref.name}: {e}")
            log.error("upload of %s failed: %s (the files stay in %s)", ref.name, e, ref.path_on_compute)
            state.outputs[ref.name] = f"FAILED, files kept in {ref.path_on_compute}"
            continue
        log.info("uploaded %s: %s", ref.name, report.summary())
        state.outputs[ref.name] = report.outcome(storage_url(ref))
        _note_failed_files(state, "upload", ref, report)
    pending = journal.pending(manifest.run_id)
    if pending:
        log.warning("%d upload job(s) not finished; the local files are kept and `mountd resume --work-dir %s` "
                    "finishes them", len(pending), manifest.work_dir)


def storage_url(ref: DataReference) -> str:
    """Where a reference's path lives in storage, for messages (no secret)."""
    base = ref.datastore.location
    sep = "" if base.endswith("/") or not ref.path_on_datastore else "/"
    return f"{base}{sep}{ref.path_on_datastore}"


def outputs_summary(uploads: list[DataReference], outputs: dict[str, str]) -> str:
    """Per upload reference, what went to which storage URL (or why nothing
    did): the end of the last line of a run and of a daemon's stop."""
    parts = [f"{ref.name}: {outputs.get(ref.name, 'not uploaded')}" for ref in uploads]
    return "outputs: " + "; ".join(parts) if parts else "no upload references"


def resume_pending(manifest: Manifest, cancel: threading.Event | None = None) -> list[str]:
    """Finish the uploads an earlier attempt of this run left unfinished in
    its work dir's journal (`cancel` stops them; they stay journaled).
    Returns what still failed, a line each."""
    if not Journal(manifest.work_dir).pending(manifest.run_id):
        return []
    log.info("work dir %s holds unfinished uploads of run %s: finishing them first",
             manifest.work_dir, manifest.run_id)
    report = resume(manifest.work_dir, manifest.run_id, cancel=cancel)
    (log.warning if report.failed else log.info)("%s", report.summary())
    return [f"resume {name}: {reason}" for name, reason in report.failed]


def run(manifest: Manifest, command: list[str] | None = None, log_level: str = "info", debug: bool = False) -> int:
    command = command or manifest.command
    if not command:
        raise UsageError("no command: give one in the manifest (command:) or after `--`")
    check_references_named(command, manifest)
    refs = list(manifest.references.values())
    from mountd.locks import is_locked
    if os.path.exists(os.path.join(manifest.work_dir, ".lock")) and is_locked(manifest.work_dir):
        _refuse_work_dir(manifest)  # before anything else is said or done
    check_sources(manifest)
    todo = plan(manifest)
    held = lock_work_dir(manifest)
    try:
        return _run(manifest, command, refs, todo, log_level, debug)
    finally:
        held.close()


def check_sources(manifest: Manifest) -> None:
    """Each datastore a download or mount reads from must take its
    credential and hold its container or share: a ConfigError (exit 2, one
    line, nothing touched) now, rather than the same message from every
    staging thread and an exit 3 after the work dir was made."""
    seen = set()
    for ref in manifest.references.values():
        cfg = ref.datastore
        if ref.mode == "upload" or cfg.type == "local" or cfg.name.lower() in seen:
            continue
        seen.add(cfg.name.lower())
        with open_store(cfg) as store:
            store.check()


def lock_work_dir(manifest: Manifest, note: str | None = None):
    """Make the run's work dir if need be and hold it for this process: a
    second run on it would stage over the first one's inputs and upload each
    other's outputs. `note` names the holder for whoever is refused."""
    from mountd.locks import lock_as
    os.makedirs(manifest.work_dir, exist_ok=True)
    held = lock_as(manifest.work_dir, note or f"(mountd run {manifest.run_id})")
    if held is None:
        _refuse_work_dir(manifest)
    return held


def _refuse_work_dir(manifest: Manifest):
    from mountd.locks import holder
    raise UsageError(f"work dir {manifest.work_dir} is in use by another mountd "
                     f"({holder(manifest.work_dir) or 'holder unknown'}): wait for it to finish, or give this "
                     f"run another --work-dir or run_id")


def _run(manifest: Manifest, command: list[str], refs: list[DataReference], todo: Plan, log_level: str,
         debug: bool) -> int:
    upload_refs = todo.uploads
    state = RunState(manifest)
    signals = StopSignals(FORWARDED, interrupt_before_work=True)
    signals.install()
    # what an earlier attempt left and still cannot be uploaded: the run goes
    # on, and the failures count in its exit code like its own uploads'
    resumed_failures = resume_pending(manifest)
    code = None
    try:
        prepare_uploads(state, upload_refs)
        stage_downloads(state, todo.downloads)
        if not state.failures:
            start_mounts(state, todo.mounts, log_level, debug)
        if state.failures:
            log.error("not starting the training process: %s", "; ".join(state.failures))
        else:
            env = child_environment(manifest, os.environ)
            values = {ref.env_name: state.paths[ref.name] for ref in refs if ref.name in state.paths}
            env.update(values)
            env["MOUNTD_RUN_ID"] = manifest.run_id
            argv = substitute(command, values)
            log.info("running in %s: %s", manifest.working_dir or os.getcwd(), " ".join(argv))
            code = child_mod.run_child(argv, env, manifest.working_dir or None, signals)
            log.info("training process exited with code %d", code)
    except KeyboardInterrupt:
        log.warning("interrupted before the training process started")
        code = 130
    finally:
        signals.work_done()  # a stop signal now stops the uploads
        stop_mounts(state)
        child_mod.reap_orphans()
        if code is not None and (manifest.upload_when == "always" or code == 0):
            upload_outputs(state, upload_refs, signals)
        elif upload_refs:
            log.info("not uploading outputs (upload_when: %s, exit code %s)", manifest.upload_when, code)
            reason = (f"upload_when: {manifest.upload_when}, exit code {code}" if code is not None
                      else "the training process did not run")
            for ref in upload_refs:
                state.outputs[ref.name] = f"not uploaded ({reason}; files kept in {ref.path_on_compute})"
        signals.restore()
    state.failures[:0] = resumed_failures
    for failure in state.failures:
        log.error("failed: %s", failure)
    if code is None or (state.failures and code == 0):
        code = EXIT_TRANSFER
    (log.warning if state.failures else log.info)("run %s finished with exit code %d; %s", manifest.run_id, code,
                                                  outputs_summary(upload_refs, state.outputs))
    return code
