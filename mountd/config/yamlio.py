"""Reading YAML files with errors that name the file, line and column, and
refusing duplicate keys (PyYAML would silently keep the last one)."""

from __future__ import annotations

import yaml

from mountd.errors import ConfigError, shorten

MERGE_TAG = "tag:yaml.org,2002:merge"


class DuplicateKey(Exception):
    def __init__(self, key: object, line: int):
        super().__init__(key)
        self.key, self.line = key, line


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == MERGE_TAG:
                continue  # `<<: *base` then overriding a key is the point of merging
            key = self.construct_object(key_node, deep=deep)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: the base class reports it
            if duplicate:
                self.duplicate(node, key, key_node.start_mark.line + 1)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def duplicate(self, node, key, line: int):
        raise DuplicateKey(key, line)


def load_yaml(path: str, what: str = "file"):
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {what} {path}: {getattr(e, 'strerror', None) or e}") from None
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)
    except DuplicateKey as e:
        raise ConfigError(f"{path}:{e.line}: duplicate key {shorten(e.key)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{yaml_where(path, text, e)}: invalid YAML: {yaml_problem(e)}") from None


def yaml_where(path: str, text: str, e: yaml.YAMLError) -> str:
    """file:line:column of a YAML error (file:line, or file:1, where PyYAML gives less)."""
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    if mark is not None:
        return f"{path}:{mark.line + 1}:{mark.column + 1}"
    position = getattr(e, "position", None)  # a ReaderError: a character YAML does not allow
    return f"{path}:{text[:position].count(chr(10)) + 1}" if isinstance(position, int) else f"{path}:1"


def yaml_problem(e: yaml.YAMLError) -> str:
    """What PyYAML found wrong, in one line, with its context when it gives one."""
    problem = getattr(e, "problem", None)
    if problem:
        context = getattr(e, "context", None)
        return f"{problem} ({context})" if context else problem
    return (str(e).splitlines() or ["unreadable"])[0]
