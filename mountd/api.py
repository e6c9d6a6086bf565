"""Python API mirroring the datastore calls of Azure Machine Learning's SDK,
against mountd's workspace file:

    ws = Workspace.from_config()
    ds = Datastore.register_azure_blob_container(ws, "training", "data", "myacct",
                                                 account_key=key, create_if_not_exists=True)
    ds.upload(src_dir="./data", target_path="datasets/cifar", overwrite=True)
    ds.download(target_path="/tmp/data", prefix="datasets/cifar")
    ws.get_default_datastore()

    images = ds.path("datasets/cifar").as_mount()
    outputs = ds.path("runs/{run_id}/outputs").as_upload(path_on_compute="./outputs")
    RunManifest(command=["python", "train.py", "--data", images, "--out", outputs]).write("job.yaml")
    # then: mountd run job.yaml, or run it here: RunManifest(...).run()

    est = Estimator(source_directory=".", entry_script="train.py", script_params={"--data_dir": images},
                    inputs=[outputs])
    est.run()  # on this node, as `mountd run` would; returns the script's exit code

A literal secret passed to a register call is kept in a private file
(mode 0600) beside the workspace file and referenced from it, never written
into the workspace file itself.
"""

from __future__ import annotations

import logging
import os
import sys
import tempfile
import uuid
from typing import Any

from mountd.config import datastores as ds_config
from mountd.config.datastores import DatastoreConfig
from mountd.config.manifest_refs import MODES as _MODES
from mountd.config.names import check_name
from mountd.config.workspace import Workspace as _WorkspaceFile
from mountd.errors import TransferFailed, UsageError
from mountd.fileio import write_atomic
from mountd.paths import normalize_path
from mountd.storage import open_store
from mountd.transfer import download as _download
from mountd.transfer import upload as _upload


class Workspace:
    """A workspace: registered datastores and one default."""

    def __init__(self, path: str | None = None, create: bool = False):
        self._file = _WorkspaceFile.load(path, missing_ok=create, named_by="Workspace.from_config")

    @classmethod
    def from_config(cls, path: str | None = None, create: bool = False) -> "Workspace":
        """The workspace in `path` (else $MOUNTD_WORKSPACE's, else the
        default location's). A file named that does not exist is a
        UsageError, unless `create`: then registering a datastore makes it."""
        return cls(path, create=create)

    @property
    def path(self) -> str:
        return self._file.path

    @property
    def datastores(self) -> dict[str, "Datastore"]:
        return {c.name: Datastore(self, c) for c in self._file.datastores.values()}

    def get_default_datastore(self) -> "Datastore":
        return Datastore(self, self._file.default)

    def set_default_datastore(self, name: str) -> None:
        self._file.set_default(name)

    def _reload(self) -> None:
        self._file = _WorkspaceFile.load(self._file.path, missing_ok=True)


class Datastore:
    """A registered datastore: upload to it, download from it. A blob
    container is an AzureBlobDatastore, a file share an AzureFileDatastore,
    as in the seed."""

    def __new__(cls, workspace: Workspace, config: DatastoreConfig | str):
        if cls is Datastore:
            kind = (workspace._file.get(config) if isinstance(config, str) else config).type
            cls = {"azure_blob": AzureBlobDatastore, "azure_file": AzureFileDatastore}.get(kind, Datastore)
        return super().__new__(cls)

    def __init__(self, workspace: Workspace, config: DatastoreConfig | str):
        if isinstance(config, str):
            config = workspace._file.get(config)
        self.workspace = workspace
        self._config = config

    # -- the seed's class methods --------------------------------------------------
    @staticmethod
    def get(workspace: Workspace, datastore_name: str) -> "Datastore":
        return Datastore(workspace, workspace._file.get(datastore_name))

    @staticmethod
    def register_azure_blob_container(workspace: Workspace, datastore_name: str, container_name: str,
                                      account_name: str | None = None, sas_token: str | None = None,
                                      account_key: str | None = None, protocol: str | None = None,
                                      endpoint: str | None = None, overwrite: bool = False,
                                      create_if_not_exists: bool = False, skip_validation: bool = False,
                                      credential: dict | None = None) -> "Datastore":
        raw = {"type": "azure_blob", "account_name": account_name, "container_name": container_name}
        return Datastore._register(workspace, datastore_name, raw, sas_token, account_key, protocol, endpoint,
                                   overwrite, create_if_not_exists, skip_validation, credential)

    @staticmethod
    def register_azure_file_share(workspace: Workspace, datastore_name: str, file_share_name: str,
                                  account_name: str | None = None, sas_token: str | None = None,
                                  account_key: str | None = None, protocol: str | None = None,
                                  endpoint: str | None = None, overwrite: bool = False,
                                  create_if_not_exists: bool = False, skip_validation: bool = False,
                                  credential: dict | None = None) -> "Datastore":
        raw = {"type": "azure_file", "account_name": account_name, "share_name": file_share_name}
        return Datastore._register(workspace, datastore_name, raw, sas_token, account_key, protocol, endpoint,
                                   overwrite, create_if_not_exists, skip_validation, credential)

    @staticmethod
    def register_local(workspace: Workspace, datastore_name: str, root: str,
                       create_if_not_exists: bool = False, overwrite: bool = False) -> "Datastore":
        root = os.path.abspath(os.path.expanduser(root))
        if create_if_not_exists:
            os.makedirs(root, exist_ok=True)
        cfg = ds_config.parse(datastore_name, {"type": "local", "root": root}, "register_local")
        with open_store(cfg) as store:
            store.check()
        workspace._file.register(cfg, overwrite=overwrite)
        return Datastore(workspace, cfg)

    @staticmethod
    def _register(workspace, name, raw, sas_token, account_key, protocol, endpoint, overwrite,
                  create_if_not_exists, skip_validation, credential) -> "Datastore":
        check_name(name)
        if endpoint:
            # The seed's `endpoint` is a suffix ("core.windows.net"); a full URL
            # (an emulator, a private endpoint) is taken as the account URL.
            raw["endpoint" if "://" in endpoint else "endpoint_suffix"] = endpoint
            if "://" not in endpoint and protocol:
                raw["endpoint"] = f"{protocol}://{raw['account_name']}." \
                                  f"{'blob' if raw['type'] == 'azure_blob' else 'file'}.{endpoint}"
        spec = dict(credential or {})
        secret_kind = "account_key" if account_key else "sas_token" if sas_token else None
        if secret_kind:
            spec = {f"{secret_kind}_file": "(pending)"}
        raw["credential"] = spec
        cfg = ds_config.parse(name, raw, "register")  # validate before writing anything
        secret_file = None
        if secret_kind:
            secret_file = _store_secret(workspace, name, secret_kind, account_key or sas_token)
            spec[f"{secret_kind}_file"] = secret_file
            cfg = ds_config.parse(name, raw, "register")
        try:
            if create_if_not_exists or not skip_validation:
                with open_store(cfg, create=create_if_not_exists) as store:
                    store.check()
            workspace._file.register(cfg, overwrite=overwrite)
        except BaseException:
            if secret_file:  # nothing registered: keep no copy of the secret
                os.unlink(secret_file)
            raise
        return Datastore(workspace, cfg)

    # -- attributes ------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._config.name

    @property
    def datastore_type(self) -> str:
        return self._config.label

    @property
    def container_name(self) -> str | None:
        return self._config.container_name

    @property
    def account_name(self) -> str | None:
        return self._config.account_name

    def __repr__(self) -> str:
        return f"Datastore(name={self.name!r}, type={self.datastore_type!r}, location={self._config.location!r})"

    # -- references for a run (the seed's Estimator inputs) --------------------------------
    def path(self, path_on_datastore: str | None = None, data_reference_name: str | None = None) -> "DataReference":
        return DataReference(self, data_reference_name, path_on_datastore)

    def as_mount(self, read_write: bool = False, prefetch: bool = False) -> "DataReference":
        return DataReference(self).as_mount(read_write, prefetch)

    def as_download(self, path_on_compute: str | None = None, overwrite: bool = False) -> "DataReference":
        return DataReference(self).as_download(path_on_compute, overwrite)

    def as_upload(self, path_on_compute: str | None = None, overwrite: bool = False) -> "DataReference":
        return DataReference(self).as_upload(path_on_compute, overwrite)

    def __str__(self) -> str:
        return str(DataReference(self))

    # -- data --------------------------------------------------------------------------
    def upload(self, src_dir: str, target_path: str | None = None, overwrite: bool = False,
               show_progress: bool = True) -> int:
        """Upload a directory tree; returns the number of files uploaded."""
        with open_store(self._config) as store:
            store.check()
            report = _upload.upload_tree(store, src_dir, target_path, overwrite=overwrite,
                                         show_progress=show_progress)
        return _result(report, show_progress)

    def upload_files(self, files: list[str], relative_root: str | None = None, target_path: str | None = None,
                     overwrite: bool = False, show_progress: bool = True) -> int:
        pairs = _upload.plan_files(files, relative_root, target_path)
        with open_store(self._config) as store:
            store.check()
            report = _upload.upload(store, pairs, overwrite=overwrite, show_progress=show_progress)
        return _result(report, show_progress)

    def download(self, target_path: str, prefix: str | None = None, overwrite: bool = False,
                 show_progress: bool = True) -> int:
        """Download objects starting with `prefix` to target_path/<name>;
        returns the number of files downloaded."""
        with open_store(self._config) as store:
            store.check()
            report = _download.download(store, target_path, prefix or "", overwrite=overwrite,
                                        show_progress=show_progress)
        return _result(report, show_progress)


class AzureBlobDatastore(Datastore):
    """A datastore on an Azure Blob container."""


class AzureFileDatastore(Datastore):
    """A datastore on an Azure File share."""


def _result(report, show_progress: bool) -> int:
    if show_progress:
        print(report.summary())
    if report.failed:
        names = ", ".join(name for name, _ in report.failed[:5])
        raise TransferFailed(f"{len(report.failed)} file(s) failed: {names}")
    return report.files


def _store_secret(workspace: Workspace, name: str, kind: str, secret: str) -> str:
    directory = os.path.join(os.path.dirname(workspace.path), "secrets")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    path = os.path.join(directory, f"{name.lower()}.{kind}")
    write_atomic(path, secret.encode("utf-8"), mode=0o600)
    return path


class DataReference:
    """A reference to data in a datastore for a run: mounted, downloaded
    before the run, or uploaded after it. Its string form is the variable
    that names its local path on the node, `$AZUREML_DATAREFERENCE_<name>`,
    so it can stand in a command line as the path itself."""

    MODES = _MODES  # the manifest's: one list of modes

    def __init__(self, datastore: "Datastore", data_reference_name: str | None = None,
                 path_on_datastore: str | None = None, mode: str = "mount", path_on_compute: str | None = None,
                 overwrite: bool = False, read_write: bool = False, prefetch: bool = False):
        if mode not in self.MODES:
            raise UsageError(f"mode must be one of {', '.join(self.MODES)}, got {mode!r}")
        if prefetch and (mode != "mount" or read_write):
            raise UsageError("prefetch is for read-only mounts: as_mount(prefetch=True) without read_write")
        path = normalize_path(path_on_datastore)
        if data_reference_name is None:
            # the seed's rule: the datastore's name for its root, else a fresh id
            data_reference_name = datastore.name if not path else uuid.uuid4().hex
        self.data_reference_name = check_name(data_reference_name, "data reference name")
        self.datastore = datastore
        self.path_on_datastore = path
        self.mode = mode
        self.path_on_compute = path_on_compute
        self.overwrite = overwrite
        self.read_write = read_write
        self.prefetch = prefetch

    def __str__(self) -> str:
        return f"$AZUREML_DATAREFERENCE_{self.data_reference_name}"

    def __repr__(self) -> str:
        return (f"DataReference(name={self.data_reference_name!r}, datastore={self.datastore.name!r}, "
                f"path={self.path_on_datastore!r}, mode={self.mode!r})")

    def _with(self, mode: str, path_on_compute: str | None, overwrite: bool | None = None,
              read_write: bool = False, prefetch: bool = False) -> "DataReference":
        return DataReference(self.datastore, self.data_reference_name, self.path_on_datastore, mode,
                             path_on_compute if path_on_compute is not None else self.path_on_compute,
                             self.overwrite if overwrite is None else overwrite, read_write, prefetch)

    def path(self, path: str | None = None, data_reference_name: str | None = None) -> "DataReference":
        return DataReference(self.datastore, data_reference_name, "/".join(
            p for p in (self.path_on_datastore, normalize_path(path)) if p), self.mode)

    def as_mount(self, read_write: bool = False, prefetch: bool = False) -> "DataReference":
        """`prefetch`: once mounted, fill the disk cache with everything
        under the path (read-only mounts; `mountd mount --prefetch`)."""
        return self._with("mount", None, read_write=read_write, prefetch=prefetch)

    def as_download(self, path_on_compute: str | None = None, overwrite: bool = False) -> "DataReference":
        return self._with("download", path_on_compute, overwrite)

    def as_upload(self, path_on_compute: str | None = None, overwrite: bool = False) -> "DataReference":
        return self._with("upload", path_on_compute, overwrite)

    def to_manifest(self) -> dict:
        body: dict[str, Any] = {"datastore": self.datastore.name, "path_on_datastore": self.path_on_datastore,
                                "mode": self.mode}
        if self.path_on_compute:
            body["path_on_compute"] = self.path_on_compute
        if self.overwrite:
            body["overwrite"] = True
        if self.read_write:
            body["read_write"] = True
        if self.prefetch:
            body["prefetch"] = True
        return body


class RunManifest:
    """What `mountd run` reads: references, a command, its environment. The
    command may hold DataReference objects; each stands for its local path."""

    def __init__(self, references=(), command=(), environment: dict | None = None, run_id: str | None = None,
                 upload_when: str = "always", cache: dict | None = None, work_dir: str | None = None,
                 working_dir: str | None = None):
        self.references = list(references)
        for arg in command:  # references used only as arguments count too
            if isinstance(arg, DataReference) and all(arg is not r for r in self.references):
                self.references.append(arg)
        names = [r.data_reference_name.lower() for r in self.references]
        if len(set(names)) != len(names):
            raise UsageError("two data references have the same name")
        self.command = [str(a) for a in command]
        self.environment = dict(environment or {})
        self.run_id, self.upload_when, self.cache, self.work_dir = run_id, upload_when, cache, work_dir
        self.working_dir = working_dir  # where the command runs; default: the current directory

    def to_dict(self) -> dict:
        body: dict[str, Any] = {}
        if self.run_id:
            body["run_id"] = self.run_id
        body["data_references"] = {r.data_reference_name: r.to_manifest() for r in self.references}
        if self.command:
            body["command"] = self.command
        if self.environment:
            body["environment"] = {k: str(v) for k, v in self.environment.items()}
        body["upload_when"] = self.upload_when
        if self.cache:
            body["cache"] = self.cache
        if self.work_dir:
            body["work_dir"] = self.work_dir
        if self.working_dir:
            body["working_dir"] = self.working_dir
        return body

    def write(self, path: str) -> str:
        return _write_yaml(self.to_dict(), path)

    def run(self, workspace: Workspace | None = None, log_level: str = "info") -> int:
        """Run it on this node through the same lifecycle as `mountd run`
        (stage, mount, run the command, unmount, upload) and return the exit
        code `mountd run` would. The manifest is kept as WORK_DIR/manifest.yaml,
        where `mountd resume` finds it. Relative work_dir and working_dir are
        relative to the current directory, as everywhere in Python. Bad input
        raises UsageError (nothing started)."""
        from mountd import logsetup, tuning
        from mountd.config.manifest import generate_run_id, load_manifest
        from mountd.run import lifecycle

        workspace = workspace or self._workspace()
        body = self.to_dict()
        body["run_id"] = self.run_id or generate_run_id()
        for key in ("work_dir", "working_dir"):
            if body.get(key):
                body[key] = os.path.abspath(os.path.expanduser(body[key]))
        with tempfile.TemporaryDirectory(prefix="mountd-manifest-") as tmp:
            draft = _write_yaml(body, os.path.join(tmp, "manifest.yaml"))
            manifest = load_manifest(draft, workspace._file)  # validated before anything is created
        os.makedirs(manifest.work_dir, exist_ok=True)
        manifest = load_manifest(_write_yaml(body, os.path.join(manifest.work_dir, "manifest.yaml")),
                                 workspace._file)
        if not logging.getLogger().handlers:  # say what happens, as `mountd run` does
            logsetup.setup(log_level)
        tuning.for_transfers()
        return lifecycle.run(manifest, log_level=log_level)

    def _workspace(self) -> Workspace:
        workspaces = {id(r.datastore.workspace): r.datastore.workspace for r in self.references}
        if len(workspaces) > 1:
            raise UsageError("the data references come from different workspaces: pass run(workspace=...)")
        return next(iter(workspaces.values())) if workspaces else Workspace.from_config()


def _write_yaml(body: dict, path: str) -> str:
    import yaml
    # 0600: a manifest's environment may hold what the job needs kept private
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w", encoding="utf-8") as f:
        yaml.safe_dump(body, f, sort_keys=False, allow_unicode=True)
    return path


class Estimator:
    """The seed's Estimator, run on this node: `python ENTRY_SCRIPT
    [--param value ...]` in `source_directory` (the job's working directory,
    so the script's ./bar.pkl is the as_upload(path_on_compute='./bar.pkl')
    reference's file), with the references of `script_params` and `inputs`
    mounted, downloaded or uploaded as in `mountd run`. `compute_target` is
    accepted for the seed's sake; the job runs here."""

    def __init__(self, source_directory: str, entry_script: str, script_params: dict | None = None,
                 inputs=(), compute_target=None, environment_variables: dict | None = None,
                 run_id: str | None = None, work_dir: str | None = None, python: str | None = None):
        if not isinstance(entry_script, str) or not entry_script:
            raise UsageError("entry_script must name the script to run")
        self.source_directory = os.path.abspath(os.path.expanduser(source_directory))
        if not os.path.isfile(os.path.join(self.source_directory, entry_script)):
            raise UsageError(f"entry_script {entry_script} is not a file in {self.source_directory}")
        self.entry_script = entry_script
        self.script_params = dict(script_params or {})
        self.inputs = list(inputs or [])
        self.compute_target = compute_target
        arguments: list[str | DataReference] = []
        for key, value in self.script_params.items():
            arguments.append(str(key))
            if value is not None:  # a flag without a value
                arguments.append(value if isinstance(value, DataReference) else str(value))
        # the interpreter mountd runs under, unless told: the one the job's packages are in
        self.manifest = RunManifest(references=self.inputs,
                                    command=[python or sys.executable, entry_script, *arguments],
                                    environment=environment_variables, run_id=run_id, work_dir=work_dir,
                                    working_dir=self.source_directory)

    def run(self, workspace: Workspace | None = None, log_level: str = "info") -> int:
        """Run it here through `mountd run`'s lifecycle; returns the exit code."""
        return self.manifest.run(workspace, log_level)
