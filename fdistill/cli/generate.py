"""The command line generated from the configuration tree.

Each option of a configuration dataclass (made with :func:`fdistill.options.option`) becomes one
flag: its name, help, type, choices and (for booleans) its ``--x`` / ``--no-x`` or negating form
come from the field, and its default shown in the help from the command's default configuration
(presets included). Parsed values are laid back over a configuration with
:func:`apply_config_options`; an option the configuration does not have (a text-to-image option
for an image teacher) is refused in one line, never recorded as used.

A small generator of our own rather than ``tyro`` or ``jsonargparse``: the tree is a handful of
flat dataclasses whose flags must stay what users already type (``--range``, ``--raw-teacher``,
``--no-progress``), nested fields keep short flat flags (``--gan-weight``, not
``--loss.gan-weight``), and the resume rule rides on the same field metadata; a library would
need as much configuration as this module has code, and one more dependency.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any

from fdistill.options import Leaf, get_path, has_path, leaves, set_path

PREFIX = "cfg__"
"""Namespace attributes of generated options start with this (``cfg__train__steps``)."""


def _base_type(t: Any) -> Any:
    """``int`` for ``int | None`` and the like; the annotation itself otherwise."""
    if typing.get_origin(t) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return args[0] if len(args) == 1 else t
    return t


def _shown(value: Any) -> str:
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)


def _add(parser: Any, leaf: Leaf, default: Any) -> str:
    meta, dest = leaf.meta, PREFIX + "__".join(leaf.path)
    help_text = meta["help"]
    base = _base_type(leaf.type)
    if base is bool:
        if meta.get("negate"):
            parser.add_argument(
                meta["negate"], dest=dest, action="store_const", const=False,
                default=argparse.SUPPRESS, help=help_text,
            )  # fmt: skip
            return meta["negate"]
        parser.add_argument(
            leaf.flag,
            dest=dest,
            action=argparse.BooleanOptionalAction,
            default=argparse.SUPPRESS,
            help=f"{help_text} (default {'on' if default else 'off'})",
        )
        return leaf.flag
    parse = meta.get("parse") or base
    if parse not in (int, float, str) and meta.get("parse") is None:
        raise TypeError(f"option {leaf.key}: give parse= for a value of type {leaf.type}")
    if default is not None:
        help_text += f" (default {_shown(default)})"
    parser.add_argument(
        leaf.flag,
        dest=dest,
        type=_typed(parse, leaf.flag),
        choices=meta.get("choices"),
        metavar=meta.get("metavar") or (None if meta.get("choices") else leaf.path[-1].upper()),
        default=argparse.SUPPRESS,
        help=help_text,
    )
    return leaf.flag


def _typed(parse, flag: str):
    """``parse`` with argparse's one-line error (ValueError -> ArgumentTypeError)."""
    if parse in (int, float, str):
        return parse

    def read(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    read.__name__ = getattr(parse, "__name__", flag)
    return read


def add_config_options(
    parser: argparse.ArgumentParser,
    cls: type,
    defaults: Any,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
    groups: dict[str, str] | None = None,
) -> None:
    """One flag per option of the dataclass ``cls`` (dotted keys in ``only`` — which may name
    options hidden from the command line — or all with ``cli`` metadata, less ``skip``).
    ``defaults``: the configuration whose values the help shows (the command's default, of
    ``cls`` or a parent class). ``groups`` maps a key prefix to an argument-group title."""
    only, skip = (set(only) if only is not None else None), set(skip)
    made: dict[str, Any] = {}
    flags = dict(parser.get_default("option_flags") or {})
    for leaf in leaves(cls):
        if leaf.key in skip or (only is not None and leaf.key not in only):
            continue
        if only is None and not leaf.meta.get("cli", True):
            continue
        target: Any = parser
        for prefix, title in (groups or {}).items():
            if leaf.key.startswith(prefix):
                target = made.setdefault(title, parser.add_argument_group(title))
        default = get_path(defaults, leaf.path) if has_path(type(defaults), leaf.path) else None
        flags[PREFIX + "__".join(leaf.path)] = _add(target, leaf, default)
    parser.set_defaults(option_flags=flags)


def given_options(args: argparse.Namespace) -> dict[tuple[str, ...], Any]:
    """The generated options the user set: path -> value."""
    return {
        tuple(k[len(PREFIX) :].split("__")): v
        for k, v in vars(args).items()
        if k.startswith(PREFIX)
    }


def apply_config_options(cfg: Any, args: argparse.Namespace, what: str) -> Any:
    """``cfg`` with every generated option the user set; one line for an option ``cfg`` does not
    have (``what`` names the run it does not apply to)."""
    flags = getattr(args, "option_flags", {})
    for path, value in given_options(args).items():
        if not has_path(type(cfg), path):
            flag = flags.get(PREFIX + "__".join(path), "--" + path[-1].replace("_", "-"))
            raise ValueError(f"{flag} does not apply to {what}")
        cfg = set_path(cfg, path, value)
    return cfg
