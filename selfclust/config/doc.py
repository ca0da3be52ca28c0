"""The config reference, generated from the pydantic schema of :mod:`selfclust.config`.

``selfclust config`` prints it as text, Markdown (docs/config.md is this output) or a complete
commented YAML config of the defaults. Nothing here lists keys by hand: every key, type,
bound, default and description comes from the schema; which methods read a ``method.*`` key
from the method models that define it (:func:`selfclust.config.key_owners`), and which read a
key of another section from its ``json_schema_extra`` (:func:`selfclust.config.key_methods`).
"""

from __future__ import annotations

import textwrap
import types
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal, Union, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from selfclust.config import (
    BY_NAME,
    METHODS,
    RunConfig,
    key_methods,
    key_owners,
    method_defaults,
)

FORMATS = ("text", "markdown", "yaml")
REGENERATE = "python -m selfclust config --format markdown > docs/config.md"
WIDTH = 100


@dataclass(frozen=True)
class Key:
    """One config key as the reference shows it."""

    name: str  # dotted: "method.lam"
    type: str  # "float, > 0, ≤ 100"
    default: Any  # as the resolved config holds it (JSON types)
    description: str
    methods: tuple[str, ...]  # the methods that read it


@dataclass(frozen=True)
class Section:
    name: str  # "" for the top-level keys (seed)
    description: str
    keys: list[Key]


def _type(ann: Any) -> str:
    """``Literal["a", "b"]`` → ``a | b``; ``int | None`` → ``int | null``; ``list[int]``."""
    origin, args = get_origin(ann), get_args(ann)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type(a) for a in args) + "]"
    if origin is list:
        return f"list[{_type(args[0])}]"
    return str(getattr(ann, "__name__", ann))


def _bounds(field: FieldInfo) -> list[str]:
    out = []
    for m in field.metadata:
        if isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, at.MinLen):
            out.append(f"at least {m.min_length} item" + ("s" if m.min_length > 1 else ""))
    return out


def _is_section(name: str, field: FieldInfo) -> bool:
    ann = field.annotation
    return name == "method" or (isinstance(ann, type) and issubclass(ann, BaseModel))


def _method_fields() -> dict[str, tuple[FieldInfo, Any]]:
    """Every ``method.*`` key: its field and default in the first method that reads it."""
    out: dict[str, tuple[FieldInfo, Any]] = {}
    for name in METHODS:
        for k, f in BY_NAME[name].model_fields.items():
            if k not in out:  # (name: each model's default is its own name)
                out[k] = (f, f.get_default(call_default_factory=True))
    return out


def _key(name: str, field: FieldInfo, default: Any, owners: tuple[str, ...]) -> Key:
    return Key(
        name=name,
        type=", ".join([_type(field.annotation), *_bounds(field)]),
        default=default,
        description=field.description or "",
        methods=tuple(m for m in key_methods(field) if m in owners),
    )


def _method_section(method: str | None, description: str) -> Section:
    keys = []
    for k, (f, default) in _method_fields().items():
        owners = key_owners(k)
        if method is not None:
            if method not in owners:
                continue
            default = BY_NAME[method].model_fields[k].get_default(call_default_factory=True)
        key = _key(f"method.{k}", f, default, owners)
        if k == "name":  # each method's model allows only its own name
            key = replace(key, type=" | ".join(METHODS))
        keys.append(key)
    return Section("method", description, keys)


def sections(method: str | None = None) -> list[Section]:
    """Every key, section by section, in schema order; with ``method`` only the keys it reads,
    with that method's defaults (:func:`selfclust.config.method_defaults`)."""
    defaults = method_defaults(method or "sela").to_dict()
    top = Section("", "", [])
    out = [top]
    for name, field in RunConfig.model_fields.items():
        if not _is_section(name, field):
            owners = key_methods(field)
            if method is None or method in owners:
                top.keys.append(_key(name, field, defaults[name], owners))
            continue
        if name == "method":
            out.append(_method_section(method, field.description or ""))
            continue
        owners = key_methods(field)
        if method is not None and method not in owners:
            continue
        model: type[BaseModel] = field.annotation  # type: ignore[assignment]
        keys = [
            _key(f"{name}.{k}", f, defaults[name][k], owners) for k, f in model.model_fields.items()
        ]
        if method is not None:
            keys = [k for k in keys if method in k.methods]
        out.append(Section(name, field.description or "", keys))
    return [s for s in out if s.keys]


def all_fields() -> Iterator[tuple[str, FieldInfo]]:
    """(dotted name, field) of every section and key of :class:`RunConfig`."""
    for name, field in RunConfig.model_fields.items():
        yield name, field
        if name == "method":
            for k, (f, _) in _method_fields().items():
                yield f"method.{k}", f
        elif _is_section(name, field):
            model: type[BaseModel] = field.annotation  # type: ignore[assignment]
            for k, f in model.model_fields.items():
                yield f"{name}.{k}", f


def yaml_value(value: Any) -> str:
    """A value as one line of YAML that loads back to it (``null``, ``1.0e-05``, ``[16, 32]``)."""
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10**6)
    return text.removesuffix("\n...\n").strip()


def _methods_label(methods: tuple[str, ...]) -> str:
    return "all" if methods == METHODS else ", ".join(methods)


def render_text(method: str | None = None) -> str:
    scope = f"the keys that method.name={method} reads" if method else "every key"
    lines = [f"selfclust config: {scope}, as `key: type = default`, section by section."]
    if method is None:
        lines.append("[sela, dec, ...]: only these methods read the key (--method NAME: one).")
    for s in sections(method):
        lines += ["", f"{s.name}: {s.description}" if s.name else "(top level)"]
        for k in s.keys:
            only = "" if method or k.methods == METHODS else f"  [{', '.join(k.methods)}]"
            lines.append(f"  {k.name}: {k.type} = {yaml_value(k.default)}{only}")
            lines += textwrap.wrap(
                k.description, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6
            )
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    """Text for a Markdown table cell: ``|`` would end the cell, a lone ``*`` start emphasis."""
    return text.replace("|", "\\|").replace("*", "\\*")


def render_markdown(method: str | None = None) -> str:
    counts = ", ".join(f"{m} {sum(len(s.keys) for s in sections(m))}" for m in METHODS)
    total = sum(len(s.keys) for s in sections(None))
    scope = f" that `method.name: {method}` reads" if method else ""
    lines = [
        "# Configuration keys",
        "",
        f"*Generated from the schema in `selfclust/config/`; do not edit it by hand. "
        f"Regenerate with `{REGENERATE}` (`tests/test_config_schema.py` fails while this "
        "file and the schema differ).*",
        "",
        "A run config is a YAML file that overrides these defaults; `key=value` arguments of "
        "`selfclust train` override it in turn (`optim.lr=0.1`, `model.widths=[16,32,64]`). "
        "Unknown keys, bad values and `method.*` keys that only another method reads are "
        "errors that name the key. `selfclust config --method NAME` lists the keys one method "
        "reads, and `--format yaml` prints a complete commented config of its defaults.",
        "",
        f"{total} keys{scope}. The *methods* column names the methods that read a key (*all*: "
        f"sela, dec, depict and dgg). Keys per method: {counts}.",
    ]
    for s in sections(method):
        title = f"`{s.name}`: {_cell(s.description)}" if s.name else "Top level"
        lines += ["", f"## {title}", ""]
        lines += ["| key | type | default | methods | description |", "|---|---|---|---|---|"]
        for k in s.keys:
            cells = [
                f"`{k.name}`",
                _cell(k.type),
                "`" + yaml_value(k.default).replace("|", "\\|") + "`",  # no escapes in code
                _methods_label(k.methods),
                _cell(k.description),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=indent + "# ", subsequent_indent=indent + "# ")


def render_yaml(method: str | None = None) -> str:
    """A complete config of ``method``'s defaults (default: sela) with each key's description
    as a comment; ``selfclust train`` accepts it, and it loads to :func:`method_defaults`."""
    name = method or "sela"
    lines = _comment(
        f"selfclust run config: every key that method.name={name} reads, at its default. "
        f"Generated by `selfclust config --method {name} --format yaml`; edit the values, "
        "delete what you keep at the default. All keys: docs/config.md.",
        "",
    )
    for s in sections(name):
        lines.append("")
        if not s.name:  # top-level scalars
            for k in s.keys:
                lines += _comment(f"[{k.type}] {k.description}", "")
                lines.append(f"{k.name}: {yaml_value(k.default)}")
            continue
        lines += _comment(s.description, "")
        lines.append(f"{s.name}:")
        for k in s.keys:
            lines += _comment(f"[{k.type}] {k.description}", "  ")
            lines.append(f"  {k.name.split('.', 1)[1]}: {yaml_value(k.default)}")
    return "\n".join(lines) + "\n"


def render(fmt: str = "text", method: str | None = None) -> str:
    """The reference in ``fmt`` (text, markdown or yaml), for every method or one."""
    if fmt not in FORMATS:
        raise ValueError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    if method is not None and method not in METHODS:
        raise ValueError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    renderers = {"text": render_text, "markdown": render_markdown, "yaml": render_yaml}
    return renderers[fmt](method)
