"""The manifest file as read: YAML parsed with the line of each key kept, so
that every message names the file, line and field it is about.

Duplicate keys, control characters, non-UTF-8 text, oversized files and YAML
errors are refused here, each as one line; `Source` places the parser's own
messages (`Source.error`), and the helpers at the end word them.
"""

from __future__ import annotations

import datetime
from typing import Callable

import yaml

from mountd.config.yamlio import UniqueKeyLoader, yaml_problem, yaml_where
from mountd.errors import UsageError
from mountd.errors import shorten as _short

MAX_MANIFEST_BYTES = 4 << 20
_NULL_TAG = "tag:yaml.org,2002:null"


class _DuplicateKey(Exception):
    def __init__(self, path: tuple, line: int):
        super().__init__(path)
        self.path, self.line = path, line


class _Loader(UniqueKeyLoader):
    """Refuses duplicate keys, naming the whole key path."""

    node_paths: dict[int, tuple] = {}  # id(mapping node) -> its key path, for messages

    def duplicate(self, node, key, line: int):
        raise _DuplicateKey(self.node_paths.get(id(node), ()) + (key,), line)


class Source:
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
        return f"{self.display}:{self.line(path)}: {field_name(path)}"

    def error(self, path: tuple, message: str, cls: type = UsageError) -> UsageError:
        return cls(one_line(f"{self.where(path)}: {message}"))

    def text(self, path: tuple, value: object, what: str = "a string") -> str:
        """A string field; a number, boolean or date counts as the text written
        (so `run_id: 007` is '007', not 7)."""
        if isinstance(value, str):
            return value
        if isinstance(value, (bool, int, float, datetime.date)) and path in self.scalars:
            return self.scalars[path]
        raise self.error(path, f"must be {what}, got {kind_of(value)}")


def load_document(path: str) -> tuple[object, Source]:
    text = _read_text(path)
    loader = None
    try:
        loader = _Loader(text)  # its reader refuses control characters at once
        node = loader.get_single_node()
        if node is None:
            return None, Source(path, {(): 1}, {})
        lines, scalars, node_paths = _index(node, loader)
        loader.node_paths = node_paths
        return loader.construct_document(node), Source(path, lines, scalars)
    except _DuplicateKey as e:
        raise UsageError(one_line(f"{path}:{e.line}: {field_name(e.path)}: duplicate key {_short(e.path[-1])}")) \
            from None
    except yaml.YAMLError as e:
        raise UsageError(one_line(f"{yaml_where(path, text, e)}: invalid YAML: {yaml_problem(e)}")) from None
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


class Index(int):
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
                lines.setdefault(path + (Index(i),), item.start_mark.line + 1)
                visit(item, path + (Index(i),), inner)

    visit(root, (), frozenset())
    return lines, scalars, node_paths


def _key(node: yaml.ScalarNode, loader: _Loader) -> object:
    try:
        key = loader.construct_object(node)
        hash(key)
        return key
    except (yaml.YAMLError, TypeError, ValueError):
        return node.value  # reported properly when the document is constructed


# -- message helpers ----------------------------------------------------------------
def field_name(path: tuple) -> str:
    """('data_references', 'images', 'mode') -> data_references.images.mode"""
    if not path:
        return "manifest"
    out = _short(str(path[0]), 40, bare=True)
    for part in path[1:]:
        if isinstance(part, Index):
            out += f"[{part}]"
        else:
            out += "." + _short(str(part), 40, bare=True)
    return out


def kind_of(value: object) -> str:
    if value is None:
        return "nothing (null)"
    names = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
             dict: "a mapping", bytes: "binary data"}
    return names.get(type(value), type(value).__name__)


def one_line(message: str) -> str:
    return " ".join(str(message).splitlines())


def encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def cli_error(option: str) -> Callable[[str], UsageError]:
    return lambda message: UsageError(one_line(f"{option}: {message}"))
