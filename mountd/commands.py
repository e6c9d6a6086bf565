"""What each command-line subcommand does: one function per subcommand,
taking the parsed arguments and returning an exit code."""

from __future__ import annotations

import json
import os

from mountd.config import datastores
from mountd.config.workspace import Workspace
from mountd.errors import EXIT_OK, TransferFailed, UsageError
from mountd.storage import open_store
from mountd.transfer import download as download_mod
from mountd.transfer import upload as upload_mod

CREDENTIAL_FLAGS = {
    "account_key_env": "account_key_env",
    "account_key_file": "account_key_file",
    "sas_token_env": "sas_token_env",
    "sas_token_file": "sas_token_file",
    "connection_string_env": "connection_string_env",
    "connection_string_file": "connection_string_file",
}


def _workspace(args, missing_ok: bool = False) -> Workspace:
    return Workspace.load(getattr(args, "workspace", None), missing_ok=missing_ok)


def _credential_spec(args) -> dict:
    spec = {key: getattr(args, attr) for attr, key in CREDENTIAL_FLAGS.items() if getattr(args, attr, None)}
    if args.managed_identity:
        spec["managed_identity"] = True
        if args.client_id:
            spec["client_id"] = args.client_id
    if args.anonymous:
        spec["anonymous"] = True
    return spec


def _register(args, raw: dict) -> int:
    ws = _workspace(args, missing_ok=True)  # the first registration creates the file
    cfg = datastores.parse(args.name, raw, "datastore register")
    if cfg.type != "local":
        _need_credential(args, cfg)
    if not args.skip_validation or args.create_if_not_exists:
        with open_store(cfg, create=args.create_if_not_exists) as store:
            store.check()
    ws.register(cfg, overwrite=args.overwrite)
    if args.set_default:
        ws.set_default(cfg.name)
    print(f"registered datastore {cfg.name} ({cfg.label}, {cfg.location}) in {ws.path}")
    return EXIT_OK


def _need_credential(args, cfg) -> None:
    """With no credential option the default chain's token is used, and a
    token goes only over https: over http, say which options there are."""
    from urllib.parse import urlsplit
    if not _credential_spec(args) and urlsplit(cfg.account_url()).scheme != "https":
        raise UsageError(f"no credential given for {cfg.account_url()}: use --account-key-env, --sas-token-env, "
                         "--connection-string-env (or their -file forms), or --anonymous for a public container "
                         "(a token from --managed-identity or the default chain needs an https endpoint)")


def register_blob(args) -> int:
    return _register(args, {"type": "azure_blob", "account_name": args.account_name,
                            "container_name": args.container_name, "endpoint": args.endpoint,
                            "endpoint_suffix": args.endpoint_suffix, "credential": _credential_spec(args)})


def register_file_share(args) -> int:
    return _register(args, {"type": "azure_file", "account_name": args.account_name,
                            "share_name": args.share_name, "endpoint": args.endpoint,
                            "endpoint_suffix": args.endpoint_suffix, "credential": _credential_spec(args)})


def register_local(args) -> int:
    root = os.path.abspath(os.path.expanduser(args.root))
    if not os.path.isdir(root) and not args.create_if_not_exists:
        raise UsageError(f"root {root} is not a directory (pass --create-if-not-exists to create it)")
    return _register(args, {"type": "local", "root": root})


def datastore_list(args) -> int:
    ws = _workspace(args)
    rows = [dict(c.describe(), default=c.name == ws.default_name)
            for c in sorted(ws.datastores.values(), key=lambda c: c.name.lower())]
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        mark = "*" if r["default"] else " "
        cfg = ws.get(r["name"])
        print(f"{mark} {r['name']:<{width}}  {cfg.label:<9}  {cfg.location}")
    return EXIT_OK


def datastore_show(args) -> int:
    ws = _workspace(args)
    cfg = ws.get(args.name)
    info = dict(cfg.describe(), default=cfg.name == ws.default_name)
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key, value in info.items():
            print(f"{key}: {value}")
    return EXIT_OK


def datastore_set_default(args) -> int:
    ws = _workspace(args)
    ws.set_default(args.name)
    print(f"default datastore is now {ws.default_name}")
    return EXIT_OK


def datastore_remove(args) -> int:
    ws = _workspace(args)
    cfg = ws.remove(args.name)
    print(f"removed datastore {cfg.name} (its data is untouched)")
    return EXIT_OK


def _finish(report) -> int:
    if report.failed:  # each failure was logged when it happened
        raise TransferFailed(f"{len(report.failed)} of {len(report.failed) + report.files} files failed "
                             "(listed above)")
    return EXIT_OK


def upload(args) -> int:
    ws = _workspace(args)
    cfg = ws.get(args.datastore)
    with open_store(cfg) as store:
        store.check()
        report = upload_mod.upload_tree(store, args.src_dir, args.target_path, overwrite=args.overwrite,
                                        workers=args.workers or upload_mod.DEFAULT_WORKERS,
                                        show_progress=not args.no_progress)
    if not args.no_progress:
        print(report.summary())
    return _finish(report)


def download(args) -> int:
    ws = _workspace(args)
    cfg = ws.get(args.datastore)
    if os.path.exists(args.target_dir) and not os.path.isdir(args.target_dir):
        raise UsageError(f"target {os.path.abspath(args.target_dir)} is not a directory")
    with open_store(cfg) as store:
        store.check()
        report = download_mod.download(store, args.target_dir, args.prefix or "", overwrite=args.overwrite,
                                       workers=args.workers or download_mod.DEFAULT_WORKERS,
                                       show_progress=not args.no_progress)
    if not args.no_progress:
        print(report.summary())
    return _finish(report)


def _parse_target(text: str) -> tuple[str, str]:
    name, _, path = text.partition(":")
    return name, path


def _cache_flags(args) -> dict:
    from mountd.config.settings import parse_duration, parse_size
    flags = {
        "dir": os.path.abspath(args.cache_dir) if args.cache_dir else None,
        "max_size": parse_size(args.cache_max_size, "--cache-max-size") if args.cache_max_size else None,
        "memory": parse_size(args.memory_cache, "--memory-cache") if args.memory_cache else None,
        "block_size": parse_size(args.block_size, "--block-size") if args.block_size else None,
        "readahead_blocks": args.readahead_blocks,
        "threads": args.threads,
        "attribute_ttl": parse_duration(args.attribute_ttl, "--attribute-ttl") if args.attribute_ttl else None,
    }
    if args.no_disk_cache:
        flags["disk"] = False
    if args.direct_io:
        flags["direct_io"] = True
    if args.strict_open:
        flags["strict_open"] = True
    return flags


def mount(args) -> int:
    from mountd.config import settings as settings_mod
    from mountd.run import mount_worker, mounts
    from mountd.paths import normalize_path

    ws = _workspace(args)
    name, path = _parse_target(args.target)
    cfg = ws.get(name)
    path = normalize_path(path)
    mountpoint = mounts.check_mountpoint(args.mountpoint)
    settings = settings_mod.resolve(ws.cache, f"{ws.path}", **_cache_flags(args))
    if args.work_dir and not args.read_write:
        raise UsageError("--work-dir is for --read-write mounts")
    prefetch_problem = settings_mod.prefetch_problem(args.read_write, settings.disk)
    if args.prefetch and prefetch_problem:
        raise UsageError(f"--prefetch {prefetch_problem}")
    if cfg.type != "local":
        from mountd.storage import resolve_credential
        resolve_credential(cfg)  # a missing secret, or a token over http: exit 2 before a worker starts
    spec = mount_worker.make_spec(cfg, path, mountpoint, settings, read_only=not args.read_write,
                                  allow_other=args.allow_other, work_dir=args.work_dir,
                                  credential_source={"workspace": ws.path}, prefetch=args.prefetch)
    if args.foreground:
        from mountd.tuning import return_freed_blocks
        return_freed_blocks()
        print(f"mounting {cfg.name}:{path or '/'} on {mountpoint} (Ctrl-C or 'mountd unmount' to stop)",
              flush=True)
        mount_worker.run(spec, on_ready=lambda: print("mounted", flush=True), debug=args.debug)
        return EXIT_OK
    mounts.start(spec, log_level=args.log_level, debug=args.debug)
    mode = f"read-write, work dir {spec['work_dir']}" if args.read_write else "read-only"
    if args.prefetch:
        mode += ", prefetching into the disk cache: see mountd status"
    print(f"mounted {cfg.name}:{path or '/'} on {mountpoint} ({mode})")
    return EXIT_OK


def unmount(args) -> int:
    from mountd.run import mounts
    left = mounts.stop(args.mountpoint, lazy=args.lazy)
    print(f"unmounted {os.path.abspath(args.mountpoint)}")
    if left:
        for remote in left:
            print(f"  not uploaded: {remote}")
        raise TransferFailed(f"{len(left)} file(s) written through the mount could not be uploaded; their local "
                             "copies are kept (run `mountd resume` once storage answers)")
    return EXIT_OK


def _load_manifest(args):
    from mountd.config.manifest import load_manifest
    ws = _workspace(args)
    return load_manifest(args.manifest, ws, work_dir=getattr(args, "work_dir", None))


def validate(args) -> int:
    from mountd.config.manifest_source import load_document
    manifest = _load_manifest(args)
    data, _ = load_document(manifest.path)
    generated = not isinstance(data, dict) or data.get("run_id") is None

    def shown(text: str) -> str:  # a generated id is not the one the next run will use
        return text.replace(manifest.run_id, "{run_id}") if generated else text

    if not getattr(args, "offline", False):
        problems = _check_storage(manifest)
        if problems:
            more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
            raise UsageError(f"{manifest.path}: {problems[0]}{more}")
    run = "run id generated at run time" if generated else f"run {manifest.run_id}"
    checked = "file only (--offline)" if getattr(args, "offline", False) else "storage checked"
    print(f"{manifest.path}: valid ({run}, node rank {manifest.node_rank}, work dir {shown(manifest.work_dir)}; "
          f"{checked})")
    print(f"  working dir: {shown(manifest.working_dir)}")
    for ref in manifest.references.values():
        rw = " read-write" if ref.read_write else ""
        print(f"  {ref.env_name}: {ref.mode}{rw} {ref.datastore.name}:{shown(ref.path_on_datastore) or '/'} "
              f"-> {shown(ref.path_on_compute)}")
    if manifest.command:
        print(f"  command: {' '.join(manifest.command)}")
    return EXIT_OK


def _check_storage(manifest) -> list[str]:
    """What storage says of the manifest's references: each datastore must
    take its credential and hold its container or share, and what a
    download or read-only mount reads must exist. One line per problem."""
    from mountd.errors import ConfigError, NotFound
    from mountd.storage.base import ObjectStore
    problems: list[str] = []
    stores: dict[str, ObjectStore | None] = {}  # None: the datastore could not be opened
    try:
        for ref in manifest.references.values():
            key = ref.datastore.name.lower()
            if key not in stores:
                try:
                    opened: ObjectStore
                    if ref.datastore.type == "local":  # never open_store: it makes the built-in store's root
                        from mountd.storage.local import LocalStore
                        from mountd.config.workspace import LOCAL_STORE_NAME
                        stores[key] = opened = LocalStore(ref.datastore.root)
                        if key != LOCAL_STORE_NAME or os.path.isdir(ref.datastore.root):  # (made when used)
                            opened.check()
                    else:
                        stores[key] = opened = open_store(ref.datastore)
                        opened.check()
                except ConfigError as e:
                    stores[key] = None
                    problems.append(f"datastore {ref.datastore.name}: {e}")
            store = stores[key]
            if store is None or ref.mode == "upload" or ref.read_write or not ref.path_on_datastore:
                continue
            try:
                store.stat(ref.path_on_datastore)
            except NotFound:
                problems.append(f"data reference {ref.name}: {ref.path_on_datastore} does not exist in datastore "
                                f"{ref.datastore.name}")
    finally:
        for store in stores.values():
            if store is not None:
                store.close()
    return problems


def run(args) -> int:
    from mountd.run import lifecycle
    manifest = _load_manifest(args)
    return lifecycle.run(manifest, args.command_argv or None, log_level=args.log_level, debug=args.debug)


def resume(args) -> int:
    from mountd.journal import Journal
    from mountd.transfer.resume import resume as resume_dir

    if args.work_dir:
        given = [os.path.abspath(d) for d in args.work_dir]
        for d in given:
            if not os.path.isdir(d):
                raise UsageError(f"work dir {d} does not exist")
        # each given dir is reported; a run's read-write mounts only when they hold jobs
        dirs = given + [m for m in _rw_mount_dirs(given) if Journal(m).has_jobs()]
    else:
        dirs = [d for d in _default_work_dirs() if Journal(d).has_jobs()]
        if not dirs:
            print("no pending uploads (looked in ./mountd-runs/* and the read-write mounts' work dirs)")
            return EXIT_OK
    failed = 0
    for d in dirs:
        report = resume_dir(d, show_progress=not args.no_progress)
        print(f"{d}: {report.summary()}")
        for name, reason in report.failed:
            print(f"  not uploaded: {name}: {reason}")
        failed += len(report.failed)
    if failed:
        raise TransferFailed(f"{failed} file(s) still not uploaded; their local copies are kept "
                             "(run `mountd resume` again once storage answers)")
    return EXIT_OK


def _subdirs(base: str) -> list[str]:
    try:
        return sorted(os.path.join(base, n) for n in os.listdir(base) if os.path.isdir(os.path.join(base, n)))
    except OSError:
        return []


def _rw_mount_dirs(run_dirs: list[str]) -> list[str]:
    """The work dirs of the read-write mounts of these runs."""
    from mountd.run.lifecycle import RW_MOUNTS_DIR
    return [m for r in run_dirs for m in _subdirs(os.path.join(r, RW_MOUNTS_DIR))]


def _default_work_dirs() -> list[str]:
    from mountd.run.mount_worker import mount_work_root
    runs = [os.path.abspath(".")] + _subdirs(os.path.abspath("mountd-runs"))
    return runs + _rw_mount_dirs(runs) + _subdirs(mount_work_root())


def daemon(args) -> int:
    from mountd.run import daemon as daemon_mod
    stop_timeout = args.stop_timeout or daemon_mod.stop_timeout_from_environment()
    manifest = _load_manifest(args)
    return daemon_mod.run(manifest, log_level=args.log_level, log_format=args.log_format, debug=args.debug,
                          stop_timeout=stop_timeout)


def status(args) -> int:
    from mountd.run import status as status_mod
    report = status_mod.gather()
    if args.json:
        print(status_mod.as_json(report))
    elif args.prometheus:
        print(status_mod.as_prometheus(report), end="")
    else:
        print(status_mod.as_text(report))
    return EXIT_OK
