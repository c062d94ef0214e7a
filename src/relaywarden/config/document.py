"""Render a configuration as commented TOML: every key with its meaning and its default.

``relaywarden init`` writes the embedded default through this module, so the file an administrator
edits documents itself from the schema's field descriptions, and cannot drift from the code.
"""

from __future__ import annotations

import textwrap
from enum import Enum

from pydantic import BaseModel

from .schema import Config


def render(config: Config) -> str:
    out: list[str] = [
        "# relaywarden configuration.",
        "# Every key is listed with its meaning; `Default:` gives the value used when the key is absent.",
        "# Check it with: relaywarden check-config FILE",
        "",
    ]
    for name, field in Config.model_fields.items():
        value = getattr(config, name)
        if isinstance(value, list):
            for item in value:
                _table(out, f"[[{name}]]", item, field.description, prefix=name)
        else:
            _table(out, f"[{name}]", value, (type(value).__doc__ or "").strip().splitlines()[0], prefix=name)
    return "\n".join(out).rstrip() + "\n"


def _table(out: list[str], header: str, model: BaseModel, description: str | None, prefix: str) -> None:
    doc = (type(model).__doc__ or description or "").strip()
    for line in doc.splitlines():
        out.append(f"# {line.strip()}" if line.strip() else "#")
    out.append(header)
    nested: list[tuple[str, BaseModel]] = []
    for key, field in type(model).model_fields.items():
        value = getattr(model, key)
        if isinstance(value, BaseModel):
            nested.append((key, value))
            continue
        _comment(out, field.description, _default_text(field))
        if value is None:
            out.append(f"# {key} =")
        else:
            out.append(f"{key} = {_toml(value)}")
    out.append("")
    for key, value in nested:
        sub = header.strip("[]")
        _table(out, f"[{sub}.{key}]", value, None, prefix=f"{prefix}.{key}")


def _default_text(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return ""
        return _toml(value)
    if field.is_required():
        return "(required)"
    return "unset" if field.default is None else _toml(field.default)


def _comment(out: list[str], description: str | None, default: str) -> None:
    text = (description or "").strip()
    if default:
        text += f" Default: {default}."
    for line in textwrap.wrap(text, 96):
        out.append(f"# {line}")


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, Enum):
        return _toml(value.value)
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        if not value:
            return "[]"
        if len(value) <= 3:
            return "[" + ", ".join(_toml(v) for v in value) + "]"
        return "[\n" + "".join(f"    {_toml(v)},\n" for v in value) + "]"
    raise TypeError(f"cannot render {value!r}")


def render_markdown() -> str:
    """docs/configuration.md: every table and key with its meaning and default, from the schema."""
    from .schema import AccessList, Delivery, Dns, Doctor, Domain, Limits, Listener, Mailbox, Route, Server

    out = ["# Configuration reference", "",
           "Generated from `src/relaywarden/config/schema.py` by "
           "`python -m relaywarden.config.document > docs/configuration.md`; `relaywarden init` writes "
           "the same descriptions as comments. `relaywarden check-config FILE` validates a file: every "
           "error names the file, line, key and fix.", ""]
    tables = [("[server]", Server), ("[[listener]]", Listener), ("[listener.relay] and [listener.connections]", AccessList),
              ("[listener.limits]", Limits), ("[[domain]]", Domain), ("[[mailbox]]", Mailbox),
              ("[[route]]", Route), ("[dns]", Dns), ("[delivery]", Delivery), ("[doctor]", Doctor)]
    for header, model in tables:
        out += [f"## `{header}`", "", (model.__doc__ or "").strip(), "", "| key | default | meaning |", "|---|---|---|"]
        for key, field in model.model_fields.items():
            default = _default_text(field) or "(table)"
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{key}` | `{default}` | {desc} |")
        out.append("")
    out += ["## The embedded default", "", "```toml", render(load_default_config()).rstrip(), "```", ""]
    return "\n".join(out)


def load_default_config() -> Config:
    from .loader import load_default

    return load_default().config


if __name__ == "__main__":
    print(render_markdown(), end="")
