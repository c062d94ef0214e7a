"""Loading a configuration: TOML text -> validated ``Config``, with the file and line of every key.

``load_config(path)`` and ``load_default()`` return a ``LoadedConfig``: the validated model plus a
``SourceMap`` that answers "which file and line set this key?" — the relay decision cites it for
every rule it applies, and every error names the file, the key, the line and the fix.
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import ValidationError

from .schema import Config, cross_problems

DEFAULT_NAME = "<embedded default>"

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """An invalid configuration.  ``problems`` lists one line per error: file:line: key: fix."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class SourceMap:
    """Maps key paths (``("listener", 0, "relay", "entries", 2)``) to line numbers of one file."""

    file: str
    lines: dict[KeyPath, int] = field(default_factory=dict)

    def line(self, path: KeyPath) -> int | None:
        """The line of the key, or of the nearest enclosing table that has one."""
        p = tuple(path)
        while p:
            if p in self.lines:
                return self.lines[p]
            p = p[:-1]
        return None

    def where(self, *path: str | int) -> str:
        line = self.line(path)
        return f"{self.file}:{line}" if line else self.file


@dataclass(frozen=True)
class LoadedConfig:
    config: Config
    source: SourceMap
    text: str

    @property
    def file(self) -> str:
        return self.source.file


_TABLE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\s*(#.*)?$")
_ARRAY_TABLE = re.compile(r"^\s*\[\[\s*([A-Za-z0-9_.\-\" ]+?)\s*\]\]\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-]+(?:\s*\.\s*[A-Za-z0-9_\-]+)*)\s*=")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"|\'([^\']*)\'')


def scan_lines(text: str) -> dict[KeyPath, int]:
    """Find the line of each table, key and array string item in TOML ``text``.

    A light scanner, not a parser: tomllib has already checked the syntax.  It follows table
    headers (counting ``[[array]]`` entries), ``key =`` lines and the string items of multi-line
    arrays, which is what the relay decision cites (``relay.entries[2]``).
    """
    lines: dict[KeyPath, int] = {}
    counters: dict[KeyPath, int] = {}
    table: KeyPath = ()
    open_array: KeyPath | None = None
    array_index = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if open_array is not None:
            for m in _STRING.finditer(_strip_comment(stripped)):
                lines.setdefault(open_array + (array_index,), number)
                array_index += 1
            if "]" in _strip_comment(stripped).replace("[", ""):
                open_array = None
            continue
        if not stripped or stripped.startswith("#"):
            continue
        m = _ARRAY_TABLE.match(stripped)
        if m:
            parent = _resolve(tuple(_split_key(m.group(1))), counters, last_is_array=True)
            table = parent
            lines[table] = number
            continue
        m = _TABLE.match(stripped)
        if m:
            table = _resolve(tuple(_split_key(m.group(1))), counters, last_is_array=False)
            lines.setdefault(table, number)
            continue
        m = _KEY.match(stripped)
        if m:
            key = table + tuple(_split_key(m.group(1)))
            lines[key] = number
            rest = _strip_comment(stripped[m.end():]).strip()
            if rest.startswith("["):
                items = list(_STRING.finditer(rest))
                for i, _ in enumerate(items):
                    lines.setdefault(key + (i,), number)
                if not _array_closed(rest):
                    open_array = key
                    array_index = len(items)
    return lines


def _strip_comment(s: str) -> str:
    out, quote = [], None
    for ch in s:
        if quote:
            if ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == "#":
            break
        out.append(ch)
    return "".join(out)


def _array_closed(rest: str) -> bool:
    depth = 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|\'[^\']*\'|[\[\]]', rest):
        if m.group(0) == "[":
            depth += 1
        elif m.group(0) == "]":
            depth -= 1
    return depth <= 0


def _split_key(key: str) -> list[str]:
    return [part.strip().strip('"') for part in key.split(".")]


def _resolve(parts: KeyPath, counters: dict[KeyPath, int], *, last_is_array: bool) -> KeyPath:
    """Turn a header like listener.relay into ("listener", 3, "relay") using array counters."""
    path: KeyPath = ()
    for i, part in enumerate(parts):
        path = path + (part,)
        is_last = i == len(parts) - 1
        if is_last and last_is_array:
            counters[path] = counters.get(path, -1) + 1
            path = path + (counters[path],)
        elif path in counters:
            path = path + (counters[path],)
    return path


def parse_text(text: str, file: str) -> LoadedConfig:
    """Validate TOML text; raise ConfigError naming file, line, key and fix."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(file, [f"{file}: TOML syntax error: {exc}"]) from None
    source = SourceMap(file, scan_lines(text))
    try:
        config = Config.model_validate(data, context={"defer_cross_checks": True})
    except ValidationError as exc:
        raise ConfigError(file, [_describe(err, source) for err in exc.errors()]) from None
    problems = cross_problems(config)
    if problems:
        raise ConfigError(file, [f"{source.where(*loc)}: {_dotted(loc) or '(top level)'}: {message}"
                                 for loc, message in problems])
    return LoadedConfig(config, source, text)


def _describe(err: dict, source: SourceMap) -> str:
    loc = tuple(err.get("loc", ()))
    key = _dotted(loc)
    line = source.line(loc)
    where = f"{source.file}:{line}" if line else source.file
    msg = err.get("msg", "invalid")
    msg = re.sub(r"^(Value|Assertion) error, ", "", msg)
    typ = err.get("type")
    if typ == "extra_forbidden":
        msg = f"unknown key {loc[-1]!r}: remove it or check its spelling (relaywarden init writes every key with its meaning)"
    elif typ == "missing":
        msg = "required key is missing: add it"
    elif typ == "enum" or typ == "literal_error":
        msg = f"{msg} (got {err.get('input')!r})"
    elif typ in _TOML_TYPES:
        wanted, example = _TOML_TYPES[typ]
        msg = f"must be {wanted}, got {_toml_value(err.get('input'))}: write it as {example}"
    return f"{where}: {key or '(top level)'}: {msg}"


# Strict scalar types (config/schema.py): what the key wants and how TOML writes it.
_TOML_TYPES = {
    "bool_type": ("a TOML boolean", "true or false, without quotes"),
    "int_type": ("a TOML integer", "a whole number without quotes or decimal point, e.g. 25"),
    "float_type": ("a TOML number", "a number without quotes, e.g. 30 or 2.5"),
}


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f"the string {value!r}"
    if isinstance(value, (int, float)):
        return f"the {'integer' if isinstance(value, int) else 'float'} {value!r}"
    return f"a {type(value).__name__}"


def file_problems(loaded: LoadedConfig) -> list[str]:
    """The files the configuration names that cannot be read (a listener's certificate and
    key), each as "file:line: key: what and the fix": what ``serve`` would stop on."""
    problems = []
    for index, listener in enumerate(loaded.config.listener):
        if listener.tls.value == "none":
            continue
        for key in ("certificate", "key"):
            name = getattr(listener, key)
            if name is None:
                continue
            path = Path(name)
            if not path.is_file() or not os.access(path, os.R_OK):
                why = "does not exist" if not path.exists() else "is not a readable file"
                problems.append(f"{loaded.source.where('listener', index, key)}: listener[{index}].{key}: "
                                f"{name} {why}: give the path of the PEM {key} (relative to the directory "
                                "serve runs in), or remove certificate and key for a self-signed pair")
    return problems


def _dotted(loc: KeyPath) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def load_config(path: str | Path) -> LoadedConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(str(p), [f"{p}: cannot read the configuration: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError(str(p), [f"{p}: the file is not UTF-8 text"]) from None
    return parse_text(text, str(p))


def default_text() -> str:
    """The embedded default configuration, with a comment on every key."""
    return resources.files("relaywarden.config").joinpath("default.toml").read_text(encoding="utf-8")


def load_default() -> LoadedConfig:
    return parse_text(default_text(), DEFAULT_NAME)
