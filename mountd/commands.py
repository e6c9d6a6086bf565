"""What each command-line subcommand does: one function per subcommand,
taking the parsed arguments and returning an exit code."""

from __future__ import annotations

import json

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


def _workspace(args) -> Workspace:
    return Workspace.load(getattr(args, "workspace", None))


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
    ws = _workspace(args)
    cfg = datastores.parse(args.name, raw, "datastore register")
    if not args.skip_validation or args.create_if_not_exists:
        with open_store(cfg, create=args.create_if_not_exists) as store:
            store.check()
    ws.register(cfg, overwrite=args.overwrite)
    if args.set_default:
        ws.set_default(cfg.name)
    print(f"registered datastore {cfg.name} ({cfg.label}, {cfg.location}) in {ws.path}")
    return EXIT_OK


def register_blob(args) -> int:
    return _register(args, {"type": "azure_blob", "account_name": args.account_name,
                            "container_name": args.container_name, "endpoint": args.endpoint,
                            "endpoint_suffix": args.endpoint_suffix, "credential": _credential_spec(args)})


def register_file_share(args) -> int:
    return _register(args, {"type": "azure_file", "account_name": args.account_name,
                            "share_name": args.share_name, "endpoint": args.endpoint,
                            "endpoint_suffix": args.endpoint_suffix, "credential": _credential_spec(args)})


def register_local(args) -> int:
    import os
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
    with open_store(cfg) as store:
        store.check()
        report = download_mod.download(store, args.target_dir, args.prefix or "", overwrite=args.overwrite,
                                       workers=args.workers or download_mod.DEFAULT_WORKERS,
                                       show_progress=not args.no_progress)
    if not args.no_progress:
        print(report.summary())
    return _finish(report)
