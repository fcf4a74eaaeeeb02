"""Stage settings as a dataclass: every knob declared once, its command-line flag generated from it.

    @dataclass
    class MyConfig:
        num_steps: int = knob(100, "training steps", group="optimization")
        attn_every: int = knob(25, "attention entropy every N steps", group="diagnostics",
                               resume_safe=True)

`add_knobs(parser, MyConfig)` adds `--num-steps` and `--attn-every` in argument groups named after
`group`, with the help text and default shown by `--help`; `from_namespace(MyConfig, ns)` builds
the config from the parsed flags; `resume_safe(MyConfig)` names the fields that may differ when a
checkpoint is resumed (they change what is measured or how work is batched, not what is trained),
so that list lives on the fields themselves and cannot drift from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import typing


def knob(
    default,
    help: str,
    *,
    group: str,
    choices=None,
    aliases: tuple[str, ...] = (),
    resume_safe: bool = False,
    negatable: bool = False,
    type=None,
    env: str | None = None,
):
    """A dataclass field that is also a command-line flag. type: the flag's parser where the
    annotation does not say it (`int | None` fields: type=int); negatable: a bool that defaults to
    True gets --x / --no-x; env: an environment variable whose value, when set, is the default."""
    meta = dict(help=help, group=group, choices=choices, aliases=aliases, resume_safe=resume_safe)
    meta.update(negatable=negatable, type=type, env=env)
    return dataclasses.field(default=default, metadata=meta)


def with_default(cls, name: str, default):
    """The knob `name` of `cls` with another default: a stage that shares a knob group (e.g. the
    checkpoint knobs) but saves at another cadence redeclares the field without repeating it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=default, metadata=field.metadata)


def add_fields(container, cls, defaults: dict | None = None, notes: dict | None = None) -> None:
    """One flag per knob of `cls` in `container` (a parser or an argument group), for the stages
    whose parser is not generated from one config. defaults: values that replace the knobs' own;
    notes: text for the {placeholders} of the help strings (missing ones read as nothing)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kwargs = _flag_kwargs(field, hints, defaults or {}, notes or {})
        container.add_argument(*_names(field), **kwargs)


def add_knobs(parser: argparse.ArgumentParser, cls, notes: dict | None = None) -> None:
    """One flag per knob of `cls`, in argument groups named by the knobs, ordered as cls.GROUPS
    lists them (then in order of first use). notes: as in add_fields."""
    hints = typing.get_type_hints(cls)
    groups = {name: parser.add_argument_group(name) for name in getattr(cls, "GROUPS", ())}
    for field in dataclasses.fields(cls):
        name = field.metadata.get("group")
        if name is None:  # a plain field: not a flag
            continue
        if name not in groups:
            groups[name] = parser.add_argument_group(name)
        kwargs = _flag_kwargs(field, hints, {}, notes or {})
        groups[name].add_argument(*_names(field), **kwargs)


def _names(field: dataclasses.Field) -> list[str]:
    return [f"--{field.name.replace('_', '-')}", *field.metadata["aliases"]]


def _flag_kwargs(field: dataclasses.Field, hints: dict, defaults: dict, notes: dict) -> dict:
    meta = field.metadata
    default = defaults.get(field.name, field.default)
    if meta["env"] and os.environ.get(meta["env"]):
        default = os.environ[meta["env"]]
    text = re.sub(r"\{(\w+)\}", lambda m: notes.get(m[1], ""), meta["help"])
    kwargs = dict(dest=field.name, help=text, default=default)
    if hints[field.name] is bool:
        kwargs["action"] = argparse.BooleanOptionalAction if meta["negatable"] else "store_true"
        return kwargs
    flag_type = meta["type"] or hints[field.name]
    if flag_type not in (int, float, str):
        raise TypeError(f"knob {field.name}: give type= for a field annotated {flag_type}")
    return {**kwargs, "type": flag_type, "choices": meta["choices"]}


def from_namespace(cls, namespace: argparse.Namespace):
    """The config `cls` from parsed flags (fields without a flag keep their defaults)."""
    values = vars(namespace)
    return cls(**{f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values})


def resume_safe(cls) -> set[str]:
    """Names of the knobs that may change when a checkpoint is resumed."""
    return {f.name for f in dataclasses.fields(cls) if f.metadata.get("resume_safe")}
