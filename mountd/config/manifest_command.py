"""The command a run executes and its environment, as a manifest gives them
or as an Azure ML v1 run configuration does.

From a v1 run configuration: `script` and `arguments`, its environment
variables, an environment file of its own; `nodeCount` above 1 is refused, and
the settings mountd does not use are listed once.
"""

from __future__ import annotations

import os
import re
import shlex
from typing import Any

from mountd.config import credentials
from mountd.config.manifest_checks import TOP_KEYS, FieldChecks
from mountd.config.manifest_refs import DataReference
from mountd.config.manifest_source import Index, encodable, kind_of, load_document
from mountd.errors import shorten as _short

# The rest of an Azure ML v1 run configuration as RunConfiguration.save()
# writes it (azureml-core 1.x; tests/data/runconfigs). Honoured: `script`,
# `arguments`, `environmentVariables`, `environment.environmentVariables` and
# `environment.python.interpreterPath`; refused when they would change the
# job: a non-empty `data` or `outputData`, `nodeCount` above 1; the rest is
# accepted and ignored, with one info line naming what was set.
V1_KEYS = {k.lower() for k in (
    "script", "arguments", "target", "framework", "communicator", "maxRunDurationSeconds", "nodeCount",
    "priority", "history", "spark", "hdi", "tensorflow", "mpi", "pytorch", "paralleltask", "sourceDirectoryDataStore",
    "amlcompute", "autoClusterComputeSpecification", "kubernetescompute", "credentialPassthrough", "docker",
    "datacaches", "instanceTypes", "applicationEndpoints", "environmentVariables", "data", "outputData")}
_V1_USED_KEYS = {"script", "arguments", "environmentVariables", "dataReferences", "environment", "command"}
_V1_ENV_KEYS = {"python", "docker", "spark", "databricks", "r", "environmentVariables", "inferencingStackVersion"}
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class CommandSection(FieldChecks):
    """`command`, `environment` and `pass_environment`, and the parts of a v1
    run configuration that stand for them."""

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
        data, _ = load_document(path)
        if not isinstance(data, dict):
            raise self.src.error(("environment",), f"{path} must hold a mapping (name, python, "
                                                   f"environmentVariables...), got {kind_of(data)}")
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
                   if key not in _V1_USED_KEYS and key not in TOP_KEYS and str(key).lower() != "nodecount"
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

    def _command(self, raw: dict, v1: bool) -> list[str]:
        path = ("command",)
        value = raw.get("command")
        if v1 and not value and raw.get("script") is not None:
            # A v1 run configuration runs `python <script> <arguments>`.
            script = self._arg(("script",), raw["script"])
            arguments = raw.get("arguments") or []
            if not isinstance(arguments, list):
                raise self.src.error(("arguments",), f"must be a list, got {kind_of(arguments)}")
            return [self._interpreter(raw), script] + [self._arg(("arguments", Index(i)), a)
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
            return [self._arg(path + (Index(i),), item) for i, item in enumerate(value)]
        raise self.src.error(path, f"must be a list of strings or one string, got {kind_of(value)}")

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
            raise self.src.error(path, f"must be a string, got {kind_of(value)}")
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
            raise self.src.error(path, f"must be a mapping of NAME: value, got {kind_of(value)}")
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
                raise self.src.error(where, f"must be a string, number or boolean, got {kind_of(item)}")
            environment[name] = self._exec_text(where, self.src.text(where, item))
        return environment

    def _pass_environment(self, value: object, environment: dict[str, str]) -> tuple[str, ...]:
        path = ("pass_environment",)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise self.src.error(path, f"must be a list of variable names, got {kind_of(value)}")
        names = []
        for i, name in enumerate(value):
            where = path + (Index(i),)
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
        if "\x00" in text or not encodable(text):
            raise self.src.error(path, "must not contain a NUL character or unpaired surrogates")
        return text
