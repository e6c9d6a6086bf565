"""The data references of a manifest: each one's datastore and path (by name
or by URI), its mode and flags, and where it lands on this node.

A path_on_compute must lie inside the allowed roots (as written and once
symbolic links are resolved), must not contain the work or cache directory,
and must not overlap another reference's; an inline local datastore written
to is held to the same roots.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mountd.config import settings, uris
from mountd.config.datastores import DatastoreConfig
from mountd.config.manifest_checks import CONTROL, FieldChecks, Root, norm_path, real_path
from mountd.config.manifest_source import kind_of
from mountd.config.names import check_name
from mountd.config.settings import CacheSettings
from mountd.errors import ConfigError
from mountd.errors import shorten as _short
from mountd.paths import is_within, normalize_path

MODES = ("mount", "download", "upload")
ENV_PREFIX = "AZUREML_DATAREFERENCE_"
_REF_KEYS = ("datastore", "path_on_datastore", "uri", "mode", "path_on_compute", "overwrite", "read_write",
             "prefetch")
_V1_REF_KEYS = {"dataStoreName": "datastore", "pathOnDataStore": "path_on_datastore", "mode": "mode",
                "pathOnCompute": "path_on_compute", "overwrite": "overwrite"}


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


class ReferenceSection(FieldChecks):
    """`data_references` (or a v1 run configuration's `dataReferences`), and
    the allowed roots they are held to."""

    def _set_roots(self, work_dir: str, cache: CacheSettings, working_dir: str) -> None:
        def root(path: str, what: str, strict: bool) -> Root:
            path = norm_path(path)
            return Root(path, real_path(path), what, strict)
        self.roots = [root(work_dir, "the work directory", True),
                      root(cache.directory, "the cache directory", True)]
        if self.working_dir:  # not when it is a system directory
            self.roots.append(root(working_dir, "the working directory", True))
        self.roots += [root(r, "an allowed root", False) for r in self.workspace.allowed_roots]

    def _references(self, raw: dict, v1: bool, work_dir: str) -> dict[str, DataReference]:
        key = "dataReferences" if v1 else "data_references"
        section = raw.get(key)
        if section is not None and not isinstance(section, dict):
            raise self.src.error((key,), f"must be a mapping of name to reference, got {kind_of(section)}")
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
            raise self.src.error(path, f"must be a mapping with a mode and a datastore or uri, got {kind_of(body)}")
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
            compute = norm_path(os.path.join(work_dir, mode + "s", name))
        else:
            text = self._expand(self._plain(path, value), self._failer(path))
            if not text.strip():
                raise self.src.error(path, "must not be empty (leave it out for the default)")
            text = os.path.expanduser(text)
            if not os.path.isabs(text) and not self.working_dir:
                raise self.src.error(path, f"{text!r} is relative to the working directory "
                                           f"{self.working_dir_base!r}{self.working_dir_note}, a system directory")
            # Relative paths are relative to the job's working directory, as in Azure ML.
            compute = norm_path(os.path.join(self.working_dir, text))
        real = real_path(compute)
        self._check_inside_roots(path, compute, real)
        self.reals[name] = real
        return compute

    def _check_inside_roots(self, path: tuple, compute: str, real: str) -> None:
        if not self._allowed(compute, real):
            inside_lexically = any(is_within(compute, r.path) for r in self.roots)
            if inside_lexically and any(compute == r.path for r in self.roots if r.strict):
                reason = "is the work, cache or working directory itself; give a directory inside it"
            elif inside_lexically and real != compute:
                reason = f"leads through a symbolic link to {real!r}, outside the allowed roots"
            else:
                reason = "is outside the allowed roots"
            raise self.src.error(path, f"{compute!r} {reason} ({self._roots_text()})")
        for root in self.roots:
            if root.strict and is_within(root.real, real):
                raise self.src.error(path, f"{compute!r} contains {root.what} {root.path!r}, "
                                           "which a mount or download there would hide")

    def _allowed(self, lexical: str, real: str) -> bool:
        # Both checks: the path as written (no '..' tricks once normalized) and
        # the path the kernel will follow (no symbolic link out of a root).
        for root in self.roots:
            if is_within(lexical, root.path) and is_within(real, root.real) \
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
            elif is_within(real, other_real):
                problem = "is inside"
            elif is_within(other_real, real):
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
            target = norm_path(os.path.join(cfg.root, ds_path))
            if CONTROL.search(target) or not self._allowed(target, real_path(target)):
                raise self.src.error(where, f"inline datastore {cfg.name!r} would be written at {target!r}, outside "
                                            f"the allowed roots ({self._roots_text()}); register it in the "
                                            "workspace, or add its root to allowed_roots", ConfigError)
