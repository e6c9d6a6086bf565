"""The run manifest: what data a run reads and writes, and what it runs.

`load_manifest` reads a YAML manifest (DESIGN §4), or the `dataReferences`
section of an Azure ML v1 run configuration, and returns a `Manifest` with
everything resolved: datastores looked up (inline ones shadow the
workspace's), `{run_id}`/`{node_rank}` expanded, paths made absolute and
checked to lie inside the allowed roots, credentials confirmed readable.

It is pure validation: nothing is created or written. Every problem raises a
one-line UsageError (ConfigError for datastores and credentials) naming the
file, line and field, e.g.

    manifest.yaml:7: data_references.images.mode: must be one of mount, download, upload, got 'copy'

This module holds the result (`Manifest`), the entry point and the top level
of the document (run id, work and working directories, cache settings,
datastores, credentials); the file as read is in manifest_source, the
references in manifest_refs, the command and environment in manifest_command.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping

from mountd.config import credentials, datastores, settings
from mountd.config.datastores import DatastoreConfig
from mountd.config.manifest_checks import TOP_KEYS, expand_placeholders, norm_path
from mountd.config.manifest_command import V1_KEYS, CommandSection
from mountd.config.manifest_refs import ENV_PREFIX, MODES, DataReference, ReferenceSection
from mountd.config.manifest_source import cli_error, kind_of, load_document, one_line
from mountd.config.names import check_name
from mountd.config.settings import CacheSettings
from mountd.config.workspace import Workspace
from mountd.errors import ConfigError, UsageError
from mountd.errors import shorten as _short

__all__ = ["ENV_PREFIX", "MODES", "RANK_VARIABLES", "DataReference", "Manifest", "detect_node_rank",
           "expand_placeholders", "generate_run_id", "load_manifest"]

log = logging.getLogger(__name__)

UPLOAD_WHEN = ("always", "on_success")
# Where launchers put a node's rank, most specific first. AZ_BATCH_NODE_ID is
# an id string rather than a rank, hence last.
RANK_VARIABLES = ("NODE_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "AZ_BATCH_NODE_ID")
MAX_KEY_FILE_BYTES = 64 << 10  # bigger than any key or token: the wrong file
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")


@dataclass(frozen=True)
class Manifest:
    path: str  # absolute path of the manifest file
    run_id: str
    node_rank: str
    work_dir: str  # absolute; not created by loading
    references: dict[str, DataReference]  # in file order
    command: list[str]  # empty: the command line must supply one
    environment: dict[str, str] = field(repr=False)  # may hold secrets
    upload_when: str  # always | on_success
    cache: CacheSettings
    # Where mountd may create, mount or delete: work dir, cache dir, the
    # workspace's allowed_roots.
    allowed_roots: tuple[str, ...] = ()
    workspace_path: str | None = None  # the workspace file it was read with
    # Variables of mountd's environment that hold a datastore secret (named by
    # the *_env credentials of the workspace's and the manifest's datastores,
    # and the chain's AZURE_CLIENT_SECRET & co when a datastore uses it): not
    # passed to the command unless listed in `pass_environment`.
    secret_variables: frozenset[str] = frozenset()
    pass_environment: tuple[str, ...] = ()  # passed on from mountd's environment as they are
    # The job's working directory: where the command runs and what a relative
    # path_on_compute is relative to (as in Azure ML). Absolute; by default the
    # directory mountd was started in when none is given.
    working_dir: str = ""

    def reference_environment(self) -> dict[str, str]:
        """$AZUREML_DATAREFERENCE_<name> -> path_on_compute, for the child."""
        return {ref.env_name: ref.path_on_compute for ref in self.references.values()}


def load_manifest(path: str, workspace: Workspace, work_dir: str | None = None,
                  environ: Mapping[str, str] | None = None) -> Manifest:
    """Read and validate a manifest; `work_dir` (from --work-dir) overrides its own."""
    environ = os.environ if environ is None else environ
    data, source = load_document(path)
    return _Parser(source, workspace, environ).parse(data, os.path.abspath(path), work_dir)


def detect_node_rank(environ: Mapping[str, str]) -> str:
    """This node's rank from the launcher's variables, "0" if none is set."""
    for var in RANK_VARIABLES:
        value = str(environ.get(var) or "").strip()
        if value:
            # It goes into paths: keep it to one harmless path component.
            rank = re.sub(r"[^A-Za-z0-9_.-]", "_", value)[:128]
            return rank if rank.strip(".") else "_" * len(rank)
    return "0"


def generate_run_id() -> str:
    """run-YYYYmmdd-HHMMSS-<6 hex>, in UTC so all nodes agree on the format."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(3)}"


class _Parser(ReferenceSection, CommandSection):
    """The top level of a manifest, and the order its sections are read in."""

    def parse(self, data: object, abspath: str, work_dir_arg: str | None) -> Manifest:
        raw = self._top(data)
        v1 = "dataReferences" in raw
        run_id = self._run_id(raw.get("run_id"))
        self.values = {"run_id": run_id, "node_rank": detect_node_rank(self.environ)}
        work_dir = self._work_dir(raw.get("work_dir"), work_dir_arg, run_id)
        working_dir = self._working_dir(raw.get("working_dir"), abspath)
        cache = self.cache = self._cache(raw.get("cache"))
        self._set_roots(work_dir, cache, working_dir)
        self._datastores(raw.get("datastores"))
        references = self._references(raw, v1, work_dir)
        command = self._command(raw, v1)
        environment = self._environment(raw, v1, references)
        pass_environment = self._pass_environment(raw.get("pass_environment"), environment)
        upload_when = self._choice(("upload_when",), raw.get("upload_when"), UPLOAD_WHEN) or "always"
        self._check_credentials(references)
        ignored = self._v1_ignored(raw) if v1 else []
        if ignored:
            log.info("%s: Azure ML v1 settings ignored (the command runs on this node, as it is): %s",
                     self.src.display, ", ".join(ignored))
        return Manifest(path=abspath, run_id=run_id, node_rank=self.values["node_rank"], work_dir=work_dir,
                        references=references, command=command, environment=environment,
                        upload_when=upload_when, cache=cache,
                        allowed_roots=tuple(dict.fromkeys(r.path for r in self.roots)),
                        workspace_path=self.workspace.path, secret_variables=self._secret_variables(),
                        pass_environment=pass_environment, working_dir=working_dir)

    def _top(self, data: object) -> dict:
        if data is None:
            raise self.src.error((), "is empty (expected a mapping with data_references, command, ...)")
        if not isinstance(data, dict):
            raise self.src.error((), f"must be a mapping of settings, got {kind_of(data)}")
        v1 = "dataReferences" in data
        for key in data:
            if key in TOP_KEYS or (v1 and isinstance(key, str) and key.lower() in V1_KEYS):
                continue
            hint = " (an Azure ML v1 run configuration needs a dataReferences section)" \
                if isinstance(key, str) and key.lower() in V1_KEYS else ""
            raise self.src.error((key,), f"unknown top-level key {_short(key)} (expected one of "
                                         f"{', '.join(TOP_KEYS)}){hint}")
        if "data_references" in data and v1:
            raise self.src.error(("dataReferences",), "give data_references or dataReferences, not both")
        for key in ("data", "outputData"):
            if v1 and data.get(key):
                # Silently dropping a run's dataset inputs would fail it later, obscurely.
                raise self.src.error((key,), "Azure ML datasets are not supported; "
                                             "describe the data with dataReferences")
        if v1:
            self._v1_node_count(data)
            if isinstance(data.get("environment"), str):
                data = dict(data, environment=self._v1_environment_file(data["environment"]))
        return data

    def _run_id(self, value: object) -> str:
        if value is None:
            return generate_run_id()
        run_id = self.src.text(("run_id",), value)
        # Only dots would climb directories once substituted into a path.
        if not _RUN_ID.fullmatch(run_id) or not run_id.strip("."):
            raise self.src.error(("run_id",), f"must be 1-128 letters, digits, '_', '.' or '-' (not only dots), "
                                              f"got {_short(run_id)}")
        return run_id

    def _work_dir(self, value: object, override: str | None, run_id: str) -> str:
        path = ("work_dir",)
        text = None if value is None else self.src.text(path, value)  # checked even when overridden
        fail, note = self._failer(path), ""
        if override is not None:
            fail = cli_error("--work-dir")
            work_dir = norm_path(os.path.abspath(os.path.expanduser(self._expand(override, fail))))
        elif text is not None:
            work_dir = norm_path(os.path.abspath(os.path.expanduser(self._expand(text, fail))))
        else:
            work_dir = norm_path(os.path.join(os.getcwd(), "mountd-runs", run_id))
            note = " (the default, under the current directory; set work_dir or --work-dir)"
        system = self._system_dir(work_dir)
        if system:
            raise fail(f"{work_dir!r}{note} is {'the root directory' if system == '/' else 'in ' + system}; "
                       "choose a directory of your own (or list it in the workspace's allowed_roots)")
        if os.path.lexists(work_dir) and not os.path.isdir(work_dir):
            raise fail(f"{work_dir!r}{note} exists and is not a directory")
        return work_dir

    def _working_dir(self, value: object, manifest_path: str) -> str:
        """The job's working directory: `working_dir` (relative to the
        manifest's directory), else the current directory. It may not be a
        system directory; the current directory may be one (a service starts
        in /), and then only a relative path_on_compute is refused."""
        path = ("working_dir",)
        self.working_dir_note = " (the directory mountd was started in; set working_dir)"
        if value is None:
            working_dir = norm_path(os.getcwd())
            self.working_dir = "" if self._system_dir(working_dir) else working_dir
            self.working_dir_base = working_dir
            return working_dir
        text = self._expand(self._plain(path, value), self._failer(path))
        if not text.strip():
            raise self.src.error(path, "must not be empty (leave it out for the directory mountd is started in)")
        working_dir = norm_path(os.path.join(os.path.dirname(manifest_path), os.path.expanduser(text)))
        system = self._system_dir(working_dir)
        if system:
            raise self.src.error(path, f"{working_dir!r} is {'the root directory' if system == '/' else 'in ' + system}"
                                       "; choose a directory of your own (or list it in the workspace's "
                                       "allowed_roots)")
        if not os.path.isdir(working_dir):
            problem = "is not a directory" if os.path.lexists(working_dir) else "does not exist"
            raise self.src.error(path, f"{working_dir!r} {problem} (a relative working_dir is relative to the "
                                       "manifest's directory)")
        self.working_dir = self.working_dir_base = working_dir
        self.working_dir_note = ""
        return working_dir

    def _cache(self, section: object) -> CacheSettings:
        # defaults < workspace `cache:` < manifest `cache:` < DATASET_MOUNT_* variables
        ws_section, ws_path = self.workspace.cache, self.workspace.path
        base = self._settings(lambda: settings.apply_section(CacheSettings(), ws_section, ws_path))
        if section is not None and not isinstance(section, dict):
            raise self.src.error(("cache",), f"must be a mapping of settings, got {kind_of(section)}")
        # Each setting alone first, so a bad value is reported at its own line.
        for key, value in (section or {}).items():
            if key not in settings.SETTING_NAMES:
                raise self.src.error(("cache", key), f"unknown cache setting {_short(key)} "
                                                     f"(known: {', '.join(settings.SETTING_NAMES)})")
            if isinstance(value, float) and value != value:  # .nan passes the duration parser
                raise self.src.error(("cache", key), "must be a number, got .nan")
            where = f"{self.src.display}:{self.src.line(('cache', key))}"
            try:
                # (B023: _settings calls it at once, within this iteration)
                self._settings(lambda: settings.apply_section(CacheSettings(), {key: value}, where),  # noqa: B023
                               ("cache", key))
            except settings.CombinedSettingsError:
                pass  # the mix of settings (memory below block size) is judged on the full section, below
        where = f"{self.src.display}:{self.src.line(('cache',))}: cache"
        from_files = self._settings(lambda: settings.apply_section(base, section, where))
        cache = self._settings(lambda: settings.apply_environment(from_files, self.environ))
        if section and section.get("dir") is not None:
            directory = norm_path(cache.directory)
            system = self._system_dir(directory)
            if system:
                raise self.src.error(("cache", "dir"), f"{directory!r} is in {system}; choose a directory of "
                                                       "your own (or list it in the workspace's allowed_roots)")
        return cache

    def _settings(self, fn: Callable[[], CacheSettings], path: tuple = ("cache",)) -> CacheSettings:
        try:
            return fn()
        except UsageError as e:
            raise type(e)(one_line(str(e))) from None
        except (ValueError, TypeError, OverflowError) as e:  # e.g. a number too large for a float
            raise self.src.error(path, f"invalid setting: {_short(str(e), bare=True)}") from None

    def _datastores(self, section: object) -> None:
        path = ("datastores",)
        if section is not None and not isinstance(section, dict):
            raise self.src.error(path, f"must be a mapping of name to datastore, got {kind_of(section)}")
        for key, body in (section or {}).items():
            where = path + (key,)
            name = self._call(where, check_name, key, "datastore name")
            if name.lower() in self.inline:
                raise self.src.error(where, f"datastore names {self.inline[name.lower()].name!r} and {name!r} "
                                            "differ only in case (names are case-insensitive)", ConfigError)
            self._check_keys_are_strings(where, body)
            if isinstance(body, dict) and body.get("type") == "local" and isinstance(body.get("root"), str) \
                    and not os.path.isabs(os.path.expanduser(body["root"])):
                # a local root written relative is relative to the manifest, so
                # a manifest and its data can travel together (the quickstart)
                body = dict(body, root=os.path.join(os.path.dirname(os.path.abspath(self.src.display)), body["root"]))
            cfg = self._call(where, datastores.parse, name, body,
                             f"{self.src.display}:{self.src.line(where)}: datastores", prefixed=True)
            if credentials.has_inline_secret(cfg.credential):
                raise self.src.error(where + ("credential",), "a manifest must not hold a secret: reference it "
                                     "with account_key_env, sas_token_env, connection_string_env or *_file",
                                     ConfigError)
            self.inline[name.lower()] = cfg
        # Inline first: they shadow the workspace's, and win ties when a URI
        # matches several datastores.
        self.stores = dict(self.inline)
        for key, cfg in self.workspace.datastores.items():
            self.stores.setdefault(key, cfg)

    def _check_keys_are_strings(self, where: tuple, body: object) -> None:
        for mapping, path in ((body, where), (body.get("credential") if isinstance(body, dict) else None,
                                              where + ("credential",))):
            for key in mapping if isinstance(mapping, dict) else ():
                if not isinstance(key, str):
                    raise self.src.error(path + (key,), f"keys must be strings, got {_short(key)}", ConfigError)

    def _check_credentials(self, references: dict[str, DataReference]) -> None:
        """Resolve each used datastore's credential once, now, so a missing
        variable or key file fails the run before anything is mounted. The
        secret read is dropped at once."""
        done = set()
        for name, ref in references.items():
            cfg = ref.datastore
            if cfg.type == "local" or cfg.name.lower() in done:
                continue
            done.add(cfg.name.lower())
            where = f"{self.src.where(self.origins[name])}: datastore {cfg.name!r}"
            self._check_key_files(cfg, where)
            try:
                if credentials.resolve(cfg.credential, where).kind in credentials.TOKEN_KINDS:
                    credentials.require_https(cfg.account_url(), where)
            except UsageError as e:
                raise type(e)(one_line(str(e))) from None

    def _check_key_files(self, cfg: DatastoreConfig, where: str) -> None:
        # credentials.resolve reads the whole file: not /dev/zero, not a FIFO.
        for key, (kind, source) in credentials.REFERENCE_KEYS.items():
            ref = (cfg.credential or {}).get(key)
            if source != "file" or not isinstance(ref, str) or not ref:
                continue
            try:
                info = os.stat(os.path.expanduser(ref))
            except (OSError, ValueError):
                continue  # resolve reports it
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(one_line(f"{where}: {kind} file {ref} is not a regular file"))
            if info.st_size > MAX_KEY_FILE_BYTES:
                raise ConfigError(one_line(f"{where}: {kind} file {ref} is larger than "
                                            f"{MAX_KEY_FILE_BYTES >> 10}KiB; is it the right file?"))
