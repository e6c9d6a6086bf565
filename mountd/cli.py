"""Command-line parsing only: each subcommand hands its arguments to one
function of `mountd.commands`; errors become one `mountd: error:` line."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback

from mountd import __version__, tuning
from mountd.errors import EXIT_FAILURE, EXIT_USAGE, MountdError
from mountd.redact import redact


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, as for every other bad input
        self.exit(EXIT_USAGE, f"mountd: error: {message} (see '{self.prog} --help')\n")


def _common(sub: bool) -> _Parser:
    """Options accepted before and after the subcommand."""
    p = _Parser(add_help=False)  # only lends its options; a _Parser as the subcommands' parents must be
    def default(value):
        # after the subcommand, an option left out must not undo one given before it
        return argparse.SUPPRESS if sub else value
    p.add_argument("--workspace", metavar="FILE", default=default(None),
                   help="workspace file (default: $MOUNTD_WORKSPACE, else ~/.config/mountd/workspace.yaml)")
    p.add_argument("--debug", action="store_true", default=default(False),
                   help="show tracebacks and debug logs")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default=default("info"),
                   help="log verbosity (default: info)")
    p.add_argument("--log-format", choices=["text", "json"], default=default("text"),
                   help="log line format (default: text)")
    return p


def _credentials(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("credential (one; secrets are referenced, never stored by mountd)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--account-key-env", metavar="VAR", help="environment variable holding the account key")
    x.add_argument("--account-key-file", metavar="FILE", help="file holding the account key")
    x.add_argument("--sas-token-env", metavar="VAR", help="environment variable holding a SAS token")
    x.add_argument("--sas-token-file", metavar="FILE", help="file holding a SAS token")
    x.add_argument("--connection-string-env", metavar="VAR", help="environment variable holding a connection string")
    x.add_argument("--connection-string-file", metavar="FILE", help="file holding a connection string")
    x.add_argument("--managed-identity", action="store_true",
                   help="the node's managed identity only (with no credential option: the default chain, "
                   "AZURE_CLIENT_* service principal, workload or managed identity, Azure CLI login)")
    x.add_argument("--anonymous", action="store_true", help="public container, no credential")
    g.add_argument("--client-id", help="client id of a user-assigned managed identity")


def build_parser() -> argparse.ArgumentParser:
    from mountd import commands as c

    common = _common(sub=True)
    parser = _Parser(prog="mountd", parents=[_common(sub=False)],
                     description="Mount, stage and upload datastore references around a training process.")
    parser.add_argument("--version", action="version", version=f"mountd {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True

    # -- runs -------------------------------------------------------------------
    p = subs.add_parser("run", help="stage, mount, run the command, upload, unmount", parents=[common])
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--work-dir", metavar="DIR", help="where references and run state go "
                   "(default: the manifest's work_dir, else ./mountd-runs/RUN_ID)")
    p.set_defaults(func=c.run)
    p.epilog = "Anything after `--` is the training command; it replaces the manifest's."

    p = subs.add_parser("resume", help="finish the uploads of an interrupted run or read-write mount",
                        parents=[common])
    p.add_argument("--work-dir", metavar="DIR", action="append",
                   help="a run's work dir (repeatable; default: ./mountd-runs/* and the read-write "
                        "mounts' work dirs)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=c.resume)

    p = subs.add_parser("daemon", help="stage and mount a manifest's data and hold it until stopped "
                        "(a systemd Type=notify service)", parents=[common])
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--work-dir", metavar="DIR", help="where references and run state go")
    p.add_argument("--stop-timeout", type=_seconds, metavar="SECONDS",
                   help="time for unmounting and uploads after SIGTERM; what is not uploaded by then is kept "
                        "and recorded (default: $DATASET_UNMOUNT_TIMEOUT_SECONDS, else 600)")
    p.set_defaults(func=c.daemon)

    p = subs.add_parser("status", help="what running daemons and mounts are doing", parents=[common])
    x = p.add_mutually_exclusive_group()
    x.add_argument("--json", action="store_true", help="as JSON")
    x.add_argument("--prometheus", action="store_true", help="in Prometheus text format")
    p.set_defaults(func=c.status)

    p = subs.add_parser("validate", help="check a manifest, its credentials and that what it reads exists in "
                        "storage, without changing anything", parents=[common])
    p.add_argument("manifest", metavar="MANIFEST")
    p.add_argument("--work-dir", metavar="DIR")
    p.add_argument("--offline", action="store_true", help="check the file only; do not ask storage")
    p.set_defaults(func=c.validate)

    # -- datastore --------------------------------------------------------------
    ds = subs.add_parser("datastore", help="register and inspect datastores", parents=[common])
    dsub = ds.add_subparsers(dest="datastore_command", metavar="ACTION", parser_class=_Parser)
    dsub.required = True

    def register(name, help_text, func):
        p = dsub.add_parser(name, help=help_text, parents=[common])
        p.add_argument("name", help="datastore name (letters, digits, '_'; case-insensitive)")
        p.add_argument("--set-default", action="store_true", help="make it the default datastore")
        p.add_argument("--overwrite", action="store_true", help="replace a datastore of the same name")
        p.add_argument("--create-if-not-exists", action="store_true",
                       help="create the container, share or directory if missing")
        p.set_defaults(func=func)
        return p

    for kind, target in (("blob", "container"), ("file-share", "share")):
        func = c.register_blob if kind == "blob" else c.register_file_share
        p = register(f"register-{kind}", f"register an Azure {'Blob container' if kind == 'blob' else 'File share'}",
                     func)
        p.add_argument("--account-name", metavar="A")
        p.add_argument(f"--{target}-name", metavar=target[0].upper(), required=True)
        p.add_argument("--endpoint", metavar="URL", help="account URL (emulators, private endpoints)")
        p.add_argument("--endpoint-suffix", metavar="SUFFIX", help="e.g. core.chinacloudapi.cn (sovereign clouds)")
        p.add_argument("--skip-validation", action="store_true", help="do not check that storage answers")
        _credentials(p)
    p = register("register-local", "register a local directory", c.register_local)
    p.add_argument("--root", metavar="DIR", required=True)
    p.set_defaults(skip_validation=False)

    p = dsub.add_parser("list", help="list datastores (* marks the default)", parents=[common])
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.datastore_list)
    p = dsub.add_parser("show", help="show one datastore (secrets redacted)", parents=[common])
    p.add_argument("name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=c.datastore_show)
    p = dsub.add_parser("set-default", help="set the default datastore", parents=[common])
    p.add_argument("name")
    p.set_defaults(func=c.datastore_set_default)
    p = dsub.add_parser("remove", help="unregister a datastore (its data is untouched)", parents=[common])
    p.add_argument("name")
    p.set_defaults(func=c.datastore_remove)

    # -- transfers --------------------------------------------------------------
    p = subs.add_parser("upload", help="upload a directory tree into a datastore", parents=[common])
    p.add_argument("datastore")
    p.add_argument("src_dir")
    p.add_argument("--target-path", metavar="P", help="path in the datastore (default: its root)")
    p.add_argument("--overwrite", action="store_true", help="replace existing objects (default: skip them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    p.add_argument("--workers", type=_count(1, 1024), metavar="N", help="files in flight")
    p.set_defaults(func=c.upload)

    p = subs.add_parser("download", help="download objects from a datastore", parents=[common])
    p.add_argument("datastore")
    p.add_argument("target_dir")
    p.add_argument("--prefix", metavar="P", help="only objects whose names start with P")
    p.add_argument("--overwrite", action="store_true", help="replace existing local files (default: skip them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or summary")
    p.add_argument("--workers", type=_count(1, 1024), metavar="N", help="requests in flight")
    p.set_defaults(func=c.download)

    # -- mounts -----------------------------------------------------------------
    p = subs.add_parser("mount", help="mount a datastore through the caching filesystem (read-only by default)",
                        parents=[common])
    p.add_argument("target", metavar="DATASTORE[:PATH]", help="datastore, optionally a directory in it")
    p.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    p.add_argument("--foreground", action="store_true", help="stay attached until unmounted (Ctrl-C)")
    p.add_argument("--read-write", action="store_true",
                   help="allow writes: files are staged locally and uploaded when closed")
    p.add_argument("--work-dir", metavar="DIR",
                   help="read-write: where staged files and the upload journal live "
                        "(default: a directory per datastore path under mountd's data dir)")
    p.add_argument("--allow-other", action="store_true",
                   help="let other users see the mount (with permission checks by the kernel)")
    p.add_argument("--prefetch", action="store_true",
                   help="once mounted, fill the disk cache with the whole path in the background "
                        "(read-only mounts; the job's reads go first)")
    g = p.add_argument_group("cache (defaults: the workspace's cache: section, then DATASET_MOUNT_* variables)")
    g.add_argument("--cache-dir", metavar="DIR", help="disk cache directory (default /var/cache/mountd as root)")
    g.add_argument("--cache-max-size", metavar="SIZE", help="disk cache cap, e.g. 50GB (default 10GiB)")
    g.add_argument("--no-disk-cache", action="store_true", help="cache in memory only")
    g.add_argument("--direct-io", action="store_true",
                   help="the kernel caches no file data: every read comes to mountd (for single-pass reading)")
    g.add_argument("--strict-open", action="store_true",
                   help="read-only: every open comes to mountd and pins the version it reads (the kernel "
                        "otherwise opens files itself)")
    g.add_argument("--memory-cache", metavar="SIZE",
                   help="memory cap for all cached and in-flight blocks (default 512MiB)")
    g.add_argument("--block-size", metavar="SIZE", help="read block size (default 16MiB)")
    g.add_argument("--readahead-blocks", type=_count(0, 256), metavar="N",
                   help="blocks read ahead of a sequential reader (default 8)")
    g.add_argument("--threads", type=_count(1, 128), metavar="N", help="concurrent storage requests (default 8)")
    g.add_argument("--attribute-ttl", metavar="DURATION", help="how long metadata is trusted (default 120s)")
    p.set_defaults(func=c.mount)

    p = subs.add_parser("unmount", help="unmount and stop its worker", parents=[common])
    p.add_argument("mountpoint", metavar="MOUNTPOINT")
    p.add_argument("--lazy", action="store_true", help="detach now even if files are open (fusermount3 -z)")
    p.set_defaults(func=c.unmount)
    return parser


def _count(low: int, high: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {value}")
        return value
    return parse


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not 0 < value <= 86400:
        raise argparse.ArgumentTypeError(f"expected 1 to 86400 seconds, got {text}")
    return value


def _interrupted() -> int:
    """Ctrl-C: one line and exit 130, now. A second Ctrl-C while leaving is
    ignored (it would print a traceback from wherever it lands), and worker
    threads still finishing a request are not waited for: what they were
    writing is unnamed until complete, so nothing half-written stays."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    print("mountd: error: interrupted", file=sys.stderr)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)
    return 130


def main(argv: list[str] | None = None) -> int:
    from mountd import logsetup

    argv = list(sys.argv[1:] if argv is None else argv)
    # `mountd run MANIFEST [options] -- COMMAND ...`: the command is split off
    # first so that its own options are never taken for mountd's.
    command = None
    if "--" in argv:
        cut = argv.index("--")
        argv, command = argv[:cut], argv[cut + 1:]
    args = build_parser().parse_args(argv)
    args.command_argv = command
    tuning.for_transfers()
    if command is not None and getattr(getattr(args, "func", None), "__name__", "") != "run":
        build_parser().error("`--` COMMAND is only for `mountd run`")
    logsetup.setup(args.log_level, args.debug, args.log_format)
    try:
        return args.func(args)
    except MountdError as e:
        if args.debug:
            traceback.print_exc()
        print(f"mountd: error: {redact(str(e))}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as e:  # a bug: say so in one line; --debug shows where
        if args.debug:
            traceback.print_exc()
        logging.getLogger("mountd").debug("unexpected error", exc_info=True)
        print(f"mountd: error: internal error: {type(e).__name__}: {redact(str(e))} "
              "(run with --debug for details)", file=sys.stderr)
        return EXIT_FAILURE
