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
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import secrets
import shlex
import stat
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, cast

import yaml

from mountd.config import credentials, datastores, settings, uris
from mountd.config.datastores import DatastoreConfig
from mountd.config.names import check_name
from mountd.config.settings import CacheSettings
from mountd.config.workspace import Workspace
from mountd.config.yamlio import UniqueKeyLoader
from mountd.errors import ConfigError, UsageError
from mountd.errors import shorten as _short
from mountd.storage.base import normalize_path

log = logging.getLogger(__name__)

MODES = ("mount", "download", "upload")
UPLOAD_WHEN = ("always", "on_success")
ENV_PREFIX = "AZUREML_DATAREFERENCE_"
# Where launchers put a node's rank, most specific first. AZ_BATCH_NODE_ID is
# an id string rather than a rank, hence last.
RANK_VARIABLES = ("NODE_RANK", "RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "AZ_BATCH_NODE_ID")
MAX_MANIFEST_BYTES = 4 << 20
MAX_KEY_FILE_BYTES = 64 << 10  # bigger than any key or token: the wrong file

# Directories a run's work dir (or an inline local datastore written to) must
# never be in, unless the workspace lists it in allowed_roots. Any top-level
# /lib* directory counts too.
SYSTEM_DIRS = ("/etc", "/usr", "/bin", "/sbin", "/boot", "/proc", "/sys", "/dev", "/var/lib", "/var/log",
               "/var/spool", "/var/mail", "/var/db")

_TOP_KEYS = ("run_id", "work_dir", "datastores", "data_references", "dataReferences", "command", "environment",
             "pass_environment", "upload_when", "cache", "working_dir")
# The rest of an Azure ML v1 run configuration as RunConfiguration.save()
# writes it (azureml-core 1.x; tests/data/runconfigs). Honoured: `script`,
# `arguments`, `environmentVariables`, `environment.environmentVariables` and
# `environment.python.interpreterPath`; refused when they would change the
# job: a non-empty `data` or `outputData`, `nodeCount` above 1; the rest is
# accepted and ignored, with one info line naming what was set.
_V1_KEYS = {k.lower() for k in (
    "script", "arguments", "target", "framework", "communicator", "maxRunDurationSeconds", "nodeCount",
    "priority", "history", "spark", "hdi", "tensorflow", "mpi", "pytorch", "paralleltask", "sourceDirectoryDataStore",
    "amlcompute", "autoClusterComputeSpecification", "kubernetescompute", "credentialPassthrough", "docker",
    "datacaches", "instanceTypes", "applicationEndpoints", "environmentVariables", "data", "outputData")}
_V1_USED_KEYS = {"script", "arguments", "environmentVariables", "dataReferences", "environment", "command"}
_V1_ENV_KEYS = {"python", "docker", "spark", "databricks", "r", "environmentVariables", "inferencingStackVersion"}
_REF_KEYS = ("datastore", "path_on_datastore", "uri", "mode", "path_on_compute", "overwrite", "read_write",
             "prefetch")
_V1_REF_KEYS = {"dataStoreName": "datastore", "pathOnDataStore": "path_on_datastore", "mode": "mode",
                "pathOnCompute": "path_on_compute", "overwrite": "overwrite"}
_RUN_ID = re.compile(r"[A-Za-z0-9_.-]{1,128}")
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_NULL_TAG = "tag:yaml.org,2002:null"


@dataclass(frozen=True)
class DataReference:
    name: str  # letters, digits, '_'; exported as $AZUREML_DATAREFERENCE_<name>
    datastore: DatastoreConfig  # a workspace datastore, an inline one, or one implied by a URI
    path_on_datastore: str  # normalized (no leading/trailing '/'); "" is the root
    mode: str  # mount | download | upload
    path_on_compute: str  # absolute, inside the allowed roots; a relative one was taken from working_dir
    overwrite: bool
    read_write: bool  # mounts only
    prefetch: bool = False  # read-only mounts only: fill the disk cache with the whole path once mounted

    @property
    def env_name(self) -> str:
        return ENV_PREFIX + self.name


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
    data, source = _load(path)
    return _Parser(source, workspace, environ).parse(data, os.path.abspath(path), work_dir)


# -- placeholders, node rank, run id ------------------------------------------
def expand_placeholders(text: str, values: Mapping[str, str]) -> str:
    """Replace {name} by values[name]; {{ and }} are literal braces. Any other
    {...} is an error, so that a typo such as {runid} cannot pass silently."""
    def sub(m: re.Match) -> str:
        token = m.group(0)
        if token in ("{{", "}}"):
            return token[0]
        if m.group(1) is None:
            raise UsageError(f"unmatched {token!r} (write {token * 2} for a literal brace)")
        if m.group(1) not in values:
            known = ", ".join("{" + k + "}" for k in values)
            raise UsageError(f"unknown placeholder {_short(token)} (known: {known}; "
                             "write {{ and }} for literal braces)")
        return values[m.group(1)]
    return _PLACEHOLDER.sub(sub, text)


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


# -- reading the YAML -----------------------------------------------------------
class _DuplicateKey(Exception):
    def __init__(self, path: tuple, line: int):
        super().__init__(path)
        self.path, self.line = path, line


class _Loader(UniqueKeyLoader):
    """Refuses duplicate keys, naming the whole key path."""

    node_paths: dict[int, tuple] = {}  # id(mapping node) -> its key path, for messages

    def duplicate(self, node, key, line: int):
        raise _DuplicateKey(self.node_paths.get(id(node), ()) + (key,), line)


class _Source:
    """The manifest's name for messages, and where each key path sits in it."""

    def __init__(self, display: str, lines: dict[tuple, int], scalars: dict[tuple, str]):
        self.display = display
        self.lines = lines  # key path -> line of the key (or list item)
        self.scalars = scalars  # key path -> a scalar's text as written

    def line(self, path: tuple) -> int:
        while path not in self.lines and path:
            path = path[:-1]  # a missing field is reported where its parent is
        return self.lines.get(path, 1)

    def where(self, path: tuple) -> str:
        return f"{self.display}:{self.line(path)}: {_field(path)}"

    def error(self, path: tuple, message: str, cls: type = UsageError) -> UsageError:
        return cls(_one_line(f"{self.where(path)}: {message}"))

    def text(self, path: tuple, value: object, what: str = "a string") -> str:
        """A string field; a number, boolean or date counts as the text written
        (so `run_id: 007` is '007', not 7)."""
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)) and path in self.scalars:
            return self.scalars[path]
        raise self.error(path, f"must be {what}, got {_kind(value)}")


def _load(path: str) -> tuple[object, _Source]:
    text = _read_text(path)
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None, _Source(path, {(): 1}, {})
        lines, scalars, node_paths = _index(node, loader)
        loader.node_paths = node_paths
        return loader.construct_document(node), _Source(path, lines, scalars)
    except _DuplicateKey as e:
        raise UsageError(_one_line(f"{path}:{e.line}: {_field(e.path)}: duplicate key {_short(e.path[-1])}")) from None
    except yaml.YAMLError as e:
        raise UsageError(_one_line(f"{_yaml_where(path, text, e)}: invalid YAML: {_yaml_problem(e)}")) from None
    except RecursionError:
        raise UsageError(f"{path}: the manifest is nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise UsageError(f"manifest {path} does not exist") from None
    except OSError as e:
        raise UsageError(f"cannot read manifest {path}: {e.strerror or e}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise UsageError(f"{path}: the manifest is larger than {MAX_MANIFEST_BYTES >> 20}MiB")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UsageError(f"{path}:{line}: the manifest is not UTF-8 text") from None


class _Index(int):
    """A list position in a key path (shown as [i]; a mapping key 1 as .1)."""


def _index(root: yaml.Node, loader: _Loader) -> tuple[dict, dict, dict]:
    """Line numbers and scalar texts by key path, and each mapping's path.
    Paths hold keys as constructed (`1:` is the int 1), as the data has them."""
    lines: dict[tuple, int] = {(): root.start_mark.line + 1}
    scalars: dict[tuple, str] = {}
    node_paths: dict[int, tuple] = {}
    budget = [100_000]  # aliases can make a small file a huge tree: stop indexing early

    def visit(node: yaml.Node, path: tuple, open_nodes: frozenset) -> None:
        if id(node) in open_nodes or budget[0] <= 0:
            return  # a recursive alias, or enough
        budget[0] -= 1
        node_paths.setdefault(id(node), path)
        if isinstance(node, yaml.ScalarNode):
            if node.tag != _NULL_TAG:
                scalars.setdefault(path, node.value)
            return
        inner = open_nodes | {id(node)}
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode):
                    child = path + (_key(key_node, loader),)
                    lines.setdefault(child, key_node.start_mark.line + 1)
                    visit(value_node, child, inner)
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                lines.setdefault(path + (_Index(i),), item.start_mark.line + 1)
                visit(item, path + (_Index(i),), inner)

    visit(root, (), frozenset())
    return lines, scalars, node_paths


def _key(node: yaml.ScalarNode, loader: _Loader) -> object:
    try:
        key = loader.construct_object(node)
        hash(key)
        return key
    except (yaml.YAMLError, TypeError, ValueError):
        return node.value  # reported properly when the document is constructed


def _yaml_where(path: str, text: str, e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}"
    position = getattr(e, "position", None)  # a ReaderError: a character YAML does not allow
    return f"{path}:{text[:position].count(chr(10)) + 1}" if isinstance(position, int) else f"{path}:1"


def _yaml_problem(e: yaml.YAMLError) -> str:
    problem = getattr(e, "problem", None)
    if problem:
        context = getattr(e, "context", None)
        return f"{problem} ({context})" if context else problem
    return (str(e).splitlines() or ["unreadable"])[0]


# -- the parser -------------------------------------------------------------------
@dataclass(frozen=True)
class _Root:
    path: str  # lexical, normalized
    real: str  # symbolic links resolved
    what: str
    strict: bool  # a reference must lie strictly inside (the work and cache dirs)


class _Parser:
    """Validates one manifest document; holds what the sections share."""

    def __init__(self, source: _Source, workspace: Workspace, environ: Mapping[str, str]):
        self.src = source
        self.workspace = workspace
        self.environ = environ
        self.values: dict[str, str] = {}  # placeholder values
        self.roots: list[_Root] = []
        self.inline: dict[str, DatastoreConfig] = {}
        self.stores: dict[str, DatastoreConfig] = {}
        self.origins: dict[str, tuple] = {}  # reference -> the field that chose its datastore
        self.compute_fields: dict[str, tuple] = {}  # reference -> its path_on_compute field
        self.reals: dict[str, str] = {}  # reference -> path_on_compute, links resolved
        self.working_dir = ""  # the base of relative path_on_compute; "" when that is a system directory
        self.working_dir_base = ""  # the working directory, even a system one (for messages)
        self.working_dir_note = ""

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

    # -- top level --------------------------------------------------------------
    def _top(self, data: object) -> dict:
        if data is None:
            raise self.src.error((), "is empty (expected a mapping with data_references, command, ...)")
        if not isinstance(data, dict):
            raise self.src.error((), f"must be a mapping of settings, got {_kind(data)}")
        v1 = "dataReferences" in data
        for key in data:
            if key in _TOP_KEYS or (v1 and isinstance(key, str) and key.lower() in _V1_KEYS):
                continue
            hint = " (an Azure ML v1 run configuration needs a dataReferences section)" \
                if isinstance(key, str) and key.lower() in _V1_KEYS else ""
            raise self.src.error((key,), f"unknown top-level key {_short(key)} (expected one of "
                                         f"{', '.join(_TOP_KEYS)}){hint}")
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

    def _v1_environment_file(self, name: str) -> dict:
        """save(separate_environment_yaml=True) writes the environment to a
        file of its own and its path, relative to the project directory (the
        one holding .azureml/ or aml_config/), or to the run configuration's."""
        base = os.path.dirname(os.path.abspath(self.src.display))
        if os.path.basename(base) in (".azureml", "aml_config"):
            base = os.path.dirname(base)
        path = os.path.join(base, self._plain(("environment",), name))
        if not os.path.isfile(path):
            raise self.src.error(("environment",), f"names an environment file that does not exist: {path}")
        data, _ = _load(path)
        if not isinstance(data, dict):
            raise self.src.error(("environment",), f"{path} must hold a mapping (name, python, "
                                                   f"environmentVariables...), got {_kind(data)}")
        return data

    def _v1_node_count(self, data: dict) -> None:
        """A run on several nodes would run here once: refuse it. The
        distributed sections carry their own nodeCount in older files."""
        for path in (("nodeCount",), ("mpi", "nodeCount"), ("pytorch", "nodeCount")):
            value: Any = data
            for key in path:
                value = value.get(key) if isinstance(value, dict) else None
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise self.src.error(path, f"must be a whole number, got {_short(value)}")
            if value > 1:
                raise self.src.error(path, f"is {value}: mountd runs the command once, on this node; "
                                           "a run on several nodes is not supported (use nodeCount: 1)")

    def _v1_ignored(self, raw: dict) -> list[str]:
        """The settings of a v1 run configuration mountd does not use, those
        set to something (not null, empty or false)."""
        def set_(value: object) -> bool:
            return value not in (None, "", False) and value != {} and value != []
        ignored = [key for key, value in raw.items()
                   if key not in _V1_USED_KEYS and key not in _TOP_KEYS and str(key).lower() != "nodecount"
                   and set_(value)]
        env = raw.get("environment")
        if isinstance(env, dict) and any(k in _V1_ENV_KEYS for k in env if isinstance(k, str)):
            for key, value in env.items():
                if key == "python" and isinstance(value, dict):
                    ignored += [f"environment.python.{k}" for k, v in value.items()
                                if k != "interpreterPath" and set_(v)]
                elif key != "environmentVariables" and set_(value):
                    ignored.append(f"environment.{key}")
        return [_short(str(k), 60, bare=True) for k in ignored]

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
            fail = _cli_error("--work-dir")
            work_dir = _norm(os.path.abspath(os.path.expanduser(self._expand(override, fail))))
        elif text is not None:
            work_dir = _norm(os.path.abspath(os.path.expanduser(self._expand(text, fail))))
        else:
            work_dir = _norm(os.path.join(os.getcwd(), "mountd-runs", run_id))
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
            working_dir = _norm(os.getcwd())
            self.working_dir = "" if self._system_dir(working_dir) else working_dir
            self.working_dir_base = working_dir
            return working_dir
        text = self._expand(self._plain(path, value), self._failer(path))
        if not text.strip():
            raise self.src.error(path, "must not be empty (leave it out for the directory mountd is started in)")
        working_dir = _norm(os.path.join(os.path.dirname(manifest_path), os.path.expanduser(text)))
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
            raise self.src.error(("cache",), f"must be a mapping of settings, got {_kind(section)}")
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
                self._settings(lambda: settings.apply_section(CacheSettings(), {key: value}, where), ("cache", key))  # noqa: B023
            except UsageError as e:
                # Errors about the mix of settings (memory below block size) wait for the full section.
                if str(e).startswith(f"{where}: cache.{key}") or "invalid setting" in str(e):
                    raise
        where = f"{self.src.display}:{self.src.line(('cache',))}: cache"
        from_files = self._settings(lambda: settings.apply_section(base, section, where))
        cache = self._settings(lambda: settings.apply_environment(from_files, self.environ))
        if section and section.get("dir") is not None:
            directory = _norm(cache.directory)
            system = self._system_dir(directory)
            if system:
                raise self.src.error(("cache", "dir"), f"{directory!r} is in {system}; choose a directory of "
                                                       "your own (or list it in the workspace's allowed_roots)")
        return cache

    def _settings(self, fn: Callable[[], CacheSettings], path: tuple = ("cache",)) -> CacheSettings:
        try:
            return fn()
        except UsageError as e:
            raise type(e)(_one_line(str(e))) from None
        except (ValueError, TypeError, OverflowError) as e:  # e.g. a number too large for a float
            raise self.src.error(path, f"invalid setting: {_short(str(e), bare=True)}") from None

    def _set_roots(self, work_dir: str, cache: CacheSettings, working_dir: str) -> None:
        def root(path: str, what: str, strict: bool) -> _Root:
            path = _norm(path)
            return _Root(path, _real(path), what, strict)
        self.roots = [root(work_dir, "the work directory", True),
                      root(cache.directory, "the cache directory", True)]
        if self.working_dir:  # not when it is a system directory
            self.roots.append(root(working_dir, "the working directory", True))
        self.roots += [root(r, "an allowed root", False) for r in self.workspace.allowed_roots]

    def _datastores(self, section: object) -> None:
        path = ("datastores",)
        if section is not None and not isinstance(section, dict):
            raise self.src.error(path, f"must be a mapping of name to datastore, got {_kind(section)}")
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

    # -- references -------------------------------------------------------------
    def _references(self, raw: dict, v1: bool, work_dir: str) -> dict[str, DataReference]:
        key = "dataReferences" if v1 else "data_references"
        section = raw.get(key)
        if section is not None and not isinstance(section, dict):
            raise self.src.error((key,), f"must be a mapping of name to reference, got {_kind(section)}")
        references: dict[str, DataReference] = {}
        names: dict[str, str] = {}
        for ref_key, body in (section or {}).items():
            path = (key, ref_key)
            name = self._call(path, check_name, ref_key, "data reference name")
            if name.lower() in names:
                raise self.src.error(path, f"duplicate data reference: {names[name.lower()]!r} and {name!r} "
                                           "differ only in case (names are case-insensitive)")
            names[name.lower()] = name
            references[name] = self._reference(path, name, body, v1, work_dir)
            self._check_overlap(name, references)
        return references

    def _reference(self, path: tuple, name: str, body: object, v1: bool, work_dir: str) -> DataReference:
        keymap = _V1_REF_KEYS if v1 else {k: k for k in _REF_KEYS}
        if not isinstance(body, dict):
            raise self.src.error(path, f"must be a mapping with a mode and a datastore or uri, got {_kind(body)}")
        fields, paths = {}, {canon: path + (key,) for key, canon in keymap.items()}
        for key, value in body.items():
            canon = keymap.get(key) if isinstance(key, str) else None
            if canon is None:
                raise self.src.error(path + (key,), f"unknown key {_short(key)} in a data reference (expected one "
                                                    f"of {', '.join(keymap)})")
            fields[canon] = value
        mode = self._mode(paths["mode"], fields.get("mode"), v1)
        overwrite = self._bool(paths["overwrite"], fields.get("overwrite"))
        read_write = self._bool(paths.get("read_write", path), fields.get("read_write"))
        if read_write and mode != "mount":
            raise self.src.error(paths["read_write"], f"is only allowed with mode mount, not {mode}")
        prefetch = self._bool(paths.get("prefetch", path), fields.get("prefetch"))
        if prefetch and mode != "mount":
            raise self.src.error(paths["prefetch"], f"is only allowed with mode mount, not {mode}")
        if prefetch and (problem := settings.prefetch_problem(read_write, self.cache.disk)):
            raise self.src.error(paths["prefetch"], problem.replace("--no-disk-cache, or ", ""))
        datastore, ds_path = self._target(path, name, fields, paths)
        compute = self._path_on_compute(paths["path_on_compute"], fields.get("path_on_compute"), name, mode,
                                        work_dir)
        self.compute_fields[name] = paths["path_on_compute"]
        self._check_local(name, datastore, ds_path, mode, read_write)
        return DataReference(name=name, datastore=datastore, path_on_datastore=ds_path, mode=mode,
                             path_on_compute=compute, overwrite=overwrite, read_write=read_write,
                             prefetch=prefetch)

    def _mode(self, path: tuple, value: object, v1: bool) -> str:
        if value is None:
            raise self.src.error(path, f"is required (one of {', '.join(MODES)})")
        # v1 run configurations write Mount, Download, Upload.
        mode = value.lower() if v1 and isinstance(value, str) else value
        if mode not in MODES:
            raise self.src.error(path, f"must be one of {', '.join(MODES)}, got {_short(value)}")
        return mode

    def _target(self, path: tuple, name: str, fields: dict, paths: dict) -> tuple[DatastoreConfig, str]:
        """The datastore and path a reference names, by uri or by datastore."""
        if fields.get("uri") is not None:
            where = paths["uri"]
            if fields.get("datastore") is not None or fields.get("path_on_datastore") is not None:
                raise self.src.error(where, "give either uri or datastore and path_on_datastore, not both")
            uri = self._plain(where, fields["uri"], text=False)
            self.origins[name] = where
            return self._call(where, uris.parse_uri, self._expand(uri, self._failer(where)), self.stores)
        if fields.get("datastore") is None:
            self.origins[name] = path
            datastore = self._lookup(path, self.workspace.default_name or self.workspace.default.name)
        else:
            where = self.origins[name] = paths["datastore"]
            datastore = self._lookup(where, self._call(where, check_name, self.src.text(where, fields["datastore"]),
                                                       "datastore name"))
        where = paths["path_on_datastore"]
        raw = fields.get("path_on_datastore")
        text = "" if raw is None else self._expand(self._plain(where, raw), self._failer(where))
        return datastore, self._call(where, normalize_path, text)

    def _lookup(self, path: tuple, name: str) -> DatastoreConfig:
        cfg = self.stores.get(name.lower())
        if cfg is None:
            raise self.src.error(path, f"unknown datastore {name!r} (known: {uris.known_names(self.stores)})")
        return cfg

    def _path_on_compute(self, path: tuple, value: object, name: str, mode: str, work_dir: str) -> str:
        if value is None:
            compute = _norm(os.path.join(work_dir, mode + "s", name))
        else:
            text = self._expand(self._plain(path, value), self._failer(path))
            if not text.strip():
                raise self.src.error(path, "must not be empty (leave it out for the default)")
            text = os.path.expanduser(text)
            if not os.path.isabs(text) and not self.working_dir:
                raise self.src.error(path, f"{text!r} is relative to the working directory "
                                           f"{self.working_dir_base!r}{self.working_dir_note}, a system directory")
            # Relative paths are relative to the job's working directory, as in Azure ML.
            compute = _norm(os.path.join(self.working_dir, text))
        real = _real(compute)
        self._check_inside_roots(path, compute, real)
        self.reals[name] = real
        return compute

    def _check_inside_roots(self, path: tuple, compute: str, real: str) -> None:
        if not self._allowed(compute, real):
            inside_lexically = any(_within(compute, r.path) for r in self.roots)
            if inside_lexically and any(compute == r.path for r in self.roots if r.strict):
                reason = "is the work, cache or working directory itself; give a directory inside it"
            elif inside_lexically and real != compute:
                reason = f"leads through a symbolic link to {real!r}, outside the allowed roots"
            else:
                reason = "is outside the allowed roots"
            raise self.src.error(path, f"{compute!r} {reason} ({self._roots_text()})")
        for root in self.roots:
            if root.strict and _within(root.real, real):
                raise self.src.error(path, f"{compute!r} contains {root.what} {root.path!r}, "
                                           "which a mount or download there would hide")

    def _allowed(self, lexical: str, real: str) -> bool:
        # Both checks: the path as written (no '..' tricks once normalized) and
        # the path the kernel will follow (no symbolic link out of a root).
        for root in self.roots:
            if _within(lexical, root.path) and _within(real, root.real) \
                    and not (root.strict and (lexical == root.path or real == root.real)):
                return True
        return False

    def _roots_text(self) -> str:
        return "; ".join(f"{r.what} {r.path}" for r in self.roots)

    def _check_overlap(self, name: str, references: dict[str, DataReference]) -> None:
        real = self.reals[name]
        for other in references:
            if other == name:
                continue
            other_real = self.reals[other]
            if real == other_real:
                problem = "is the same directory as"
            elif _within(real, other_real):
                problem = "is inside"
            elif _within(other_real, real):
                problem = "contains"
            else:
                continue
            raise self.src.error(self.compute_fields[name], f"{references[name].path_on_compute!r} {problem} the "
                                 f"path_on_compute of reference {other!r} ({references[other].path_on_compute!r})")

    def _check_local(self, name: str, cfg: DatastoreConfig, ds_path: str, mode: str, read_write: bool) -> None:
        if cfg.type != "local":
            return
        where = self.origins[name]
        assert cfg.root is not None  # required for a local datastore (config/datastores)
        if mode != "upload" and not os.path.isdir(cfg.root):
            raise self.src.error(where, f"datastore {cfg.name!r}: its root {cfg.root!r} does not exist "
                                        f"or is not a directory (a {mode} reads from it)", ConfigError)
        # An upload to a manifest's own local datastore writes wherever its
        # root says: hold it to the allowed roots, as for path_on_compute. A
        # registered datastore was chosen by the workspace's owner.
        writes = mode == "upload" or read_write
        if writes and self.inline.get(cfg.name.lower()) is cfg:
            target = _norm(os.path.join(cfg.root, ds_path))
            if _CONTROL.search(target) or not self._allowed(target, _real(target)):
                raise self.src.error(where, f"inline datastore {cfg.name!r} would be written at {target!r}, outside "
                                            f"the allowed roots ({self._roots_text()}); register it in the "
                                            "workspace, or add its root to allowed_roots", ConfigError)

    # -- command and environment ------------------------------------------------
    def _command(self, raw: dict, v1: bool) -> list[str]:
        path = ("command",)
        value = raw.get("command")
        if v1 and not value and raw.get("script") is not None:
            # A v1 run configuration runs `python <script> <arguments>`.
            script = self._arg(("script",), raw["script"])
            arguments = raw.get("arguments") or []
            if not isinstance(arguments, list):
                raise self.src.error(("arguments",), f"must be a list, got {_kind(arguments)}")
            return [self._interpreter(raw), script] + [self._arg(("arguments", _Index(i)), a)
                                                        for i, a in enumerate(arguments)]
        if value is None:
            return []
        if isinstance(value, str):
            try:
                words = shlex.split(value)
            except ValueError as e:
                raise self.src.error(path, f"cannot split into words: {e}") from None
            return [self._arg(path, w) for w in words]
        if isinstance(value, list):
            return [self._arg(path + (_Index(i),), item) for i, item in enumerate(value)]
        raise self.src.error(path, f"must be a list of strings or one string, got {_kind(value)}")

    def _interpreter(self, raw: dict) -> str:
        """environment.python.interpreterPath of a v1 run configuration, or python."""
        env = raw.get("environment")
        python = env.get("python") if isinstance(env, dict) else None
        value = python.get("interpreterPath") if isinstance(python, dict) else None
        if value is None or value == "":
            return "python"
        return self._arg(("environment", "python", "interpreterPath"), value)

    def _arg(self, path: tuple, value: object) -> str:
        if isinstance(value, (list, dict)) or value is None:
            raise self.src.error(path, f"must be a string, got {_kind(value)}")
        return self._exec_text(path, self.src.text(path, value))

    def _environment(self, raw: dict, v1: bool, references: dict[str, DataReference]) -> dict[str, str]:
        path: tuple[str, ...] = ("environment",)
        value = raw.get("environment")
        if v1 and isinstance(value, dict) and any(k in _V1_ENV_KEYS for k in value if isinstance(k, str)):
            # A v1 environment definition: only its variables concern us.
            path, value = path + ("environmentVariables",), value.get("environmentVariables")
        environment = self._variables(path, value, references)
        if v1:
            # The run's own variables (RunConfiguration.environment_variables)
            # come on top of its environment's.
            environment.update(self._variables(("environmentVariables",), raw.get("environmentVariables"),
                                               references))
        return environment

    def _variables(self, path: tuple, value: object, references: dict[str, DataReference]) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.src.error(path, f"must be a mapping of NAME: value, got {_kind(value)}")
        taken = {ref.env_name: ref.name for ref in references.values()}
        environment = {}
        for name, item in value.items():
            where = path + (name,)
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise self.src.error(where, f"invalid environment variable name {_short(name)}: use letters, "
                                            "digits and '_', not starting with a digit")
            if name in taken:
                raise self.src.error(where, f"is set by data reference {taken[name]!r}")
            if item is None or isinstance(item, (list, dict)):
                # Never echo the value: environment values are often secrets.
                raise self.src.error(where, f"must be a string, number or boolean, got {_kind(item)}")
            environment[name] = self._exec_text(where, self.src.text(where, item))
        return environment

    def _pass_environment(self, value: object, environment: dict[str, str]) -> tuple[str, ...]:
        path = ("pass_environment",)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.src.error(path, f"must be a list of variable names, got {_kind(value)}")
        names = []
        for i, name in enumerate(value):
            where = path + (_Index(i),)
            if not isinstance(name, str) or not _ENV_NAME.fullmatch(name):
                raise self.src.error(where, f"invalid environment variable name {_short(name)}: use letters, "
                                            "digits and '_', not starting with a digit")
            if name in environment:
                raise self.src.error(where, f"{name} is also set under environment: give it in one place")
            names.append(name)
        return tuple(dict.fromkeys(names))

    def _secret_variables(self) -> frozenset[str]:
        """The variables the datastores of the workspace and the manifest
        read secrets from (see Manifest.secret_variables)."""
        names = set()
        for cfg in self.stores.values():
            if cfg.type != "local":
                names |= credentials.secret_variables(cfg.credential)
        return frozenset(names)

    def _exec_text(self, path: tuple, text: str) -> str:
        """Text bound for exec(): no NUL byte, encodable."""
        if "\x00" in text or not _encodable(text):
            raise self.src.error(path, "must not contain a NUL character or unpaired surrogates")
        return text

    # -- credentials --------------------------------------------------------------
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
                    from mountd.storage.identity import require_https
                    require_https(cfg.account_url(), where)
            except UsageError as e:
                raise type(e)(_one_line(str(e))) from None

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
                raise ConfigError(_one_line(f"{where}: {kind} file {ref} is not a regular file"))
            if info.st_size > MAX_KEY_FILE_BYTES:
                raise ConfigError(_one_line(f"{where}: {kind} file {ref} is larger than "
                                            f"{MAX_KEY_FILE_BYTES >> 10}KiB; is it the right file?"))

    # -- shared checks ------------------------------------------------------------
    def _choice(self, path: tuple, value: object, choices: tuple) -> str | None:
        if value is not None and value not in choices:
            raise self.src.error(path, f"must be one of {', '.join(choices)}, got {_short(value)}")
        return cast("str | None", value)  # one of the choices, or None

    def _bool(self, path: tuple, value: object) -> bool:
        if value is None:
            return False
        if not isinstance(value, bool):
            raise self.src.error(path, f"must be true or false, got {_short(value)}")
        return value

    def _plain(self, path: tuple, value: object, text: bool = True) -> str:
        """A path-like field: one line of printable text."""
        if not text and not isinstance(value, str):
            raise self.src.error(path, f"must be a string, got {_kind(value)}")
        result = self.src.text(path, value)
        if _CONTROL.search(result) or not _encodable(result):
            raise self.src.error(path, "must not contain control characters or unpaired surrogates")
        return result

    def _expand(self, text: str, fail: Callable[[str], UsageError]) -> str:
        try:
            return expand_placeholders(text, self.values)
        except UsageError as e:
            raise fail(str(e)) from None

    def _failer(self, path: tuple) -> Callable[[str], UsageError]:
        return lambda message: self.src.error(path, message)

    def _call(self, path: tuple, fn: Callable, *args, prefixed: bool = False):
        """Run a check from another module, placing its error at `path`
        (unless its message already says where)."""
        try:
            return fn(*args)
        except UsageError as e:
            message = _one_line(str(e))
            raise type(e)(message) if prefixed else self.src.error(path, message, type(e)) from None
        except (ValueError, TypeError, OverflowError) as e:
            raise self.src.error(path, f"invalid value: {_short(str(e), bare=True)}") from None

    def _system_dir(self, path: str) -> str | None:
        """The system directory `path` is in (lexically or through links),
        unless the workspace allows it."""
        real = _real(path)
        for root in self.workspace.allowed_roots:
            root = _norm(root)
            if _within(path, root) or _within(real, _real(root)):
                return None
        for candidate in (path, real):
            if candidate == "/":
                return "/"
            top = candidate.split("/")[1]
            if top.startswith("lib"):
                return "/" + top
            for system in SYSTEM_DIRS:
                if _within(candidate, system):
                    return system
        return None


# -- path helpers -------------------------------------------------------------------
def _norm(path: str) -> str:
    """Normalized absolute path; POSIX keeps a leading '//', we do not."""
    path = os.path.normpath(path)
    return "/" + path.lstrip("/") if path.startswith("//") else path


def _real(path: str) -> str:
    """`path` with symbolic links resolved as far as it exists (the rest does
    not exist yet, so it cannot be a link)."""
    head = path
    tail: list[str] = []
    while not os.path.lexists(head) and head != "/":
        head, name = os.path.split(head)
        tail.insert(0, name)
    return _norm(os.path.join(os.path.realpath(head), *tail))


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


# -- message helpers ----------------------------------------------------------------
def _field(path: tuple) -> str:
    """('data_references', 'images', 'mode') -> data_references.images.mode"""
    if not path:
        return "manifest"
    out = _short(str(path[0]), 40, bare=True)
    for part in path[1:]:
        if isinstance(part, _Index):
            out += f"[{part}]"
        else:
            out += "." + _short(str(part), 40, bare=True)
    return out


def _kind(value: object) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", bytes: "binary data"}
    return names.get(type(value), type(value).__name__)


def _one_line(message: str) -> str:
    return " ".join(str(message).splitlines())


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _cli_error(option: str) -> Callable[[str], UsageError]:
    return lambda message: UsageError(_one_line(f"{option}: {message}"))
