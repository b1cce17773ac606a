"""Options as data: a dataclass field that knows its help, its flag and its resume rule.

Every configuration of fdistill (the engine's loop settings, a method's loss settings, a
command's run settings) is a dataclass whose fields are made with :func:`option`. The command
line is generated from these fields (:mod:`fdistill.cli.generate`), and strict ``--resume``
takes the fields that may change (``resumable=True``) from the same metadata
(:func:`resumable_paths`), so a knob is declared once: its default, its help, its flag, and
whether a resumed run may change it.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any

_MISSING = dataclasses.MISSING


def option(
    default: Any = _MISSING,
    *,
    help: str,
    default_factory: Callable[[], Any] | Any = _MISSING,
    flag: str | None = None,
    negate: str | None = None,
    choices: Sequence[Any] | None = None,
    parse: Callable[[str], Any] | None = None,
    metavar: str | None = None,
    resumable: bool = False,
    cli: bool = True,
    legacy: Any = _MISSING,
) -> Any:
    """A dataclass field with command-line metadata.

    ``flag``: the option's name (default ``--field-name``); ``negate``: for a boolean whose
    flag turns it off (e.g. ``--no-progress`` for ``progress``); ``choices`` / ``parse`` /
    ``metavar``: how a value is read; ``resumable``: ``--resume`` may change it (it does not
    change what is trained); ``cli``: whether the command line offers it at all; ``legacy``:
    for an option added after runs were saved, the value those runs behaved as (a strict
    resume of such a run compares against it).
    """
    meta = {
        "help": help,
        "flag": flag,
        "negate": negate,
        "choices": tuple(choices) if choices is not None else None,
        "parse": parse,
        "metavar": metavar,
        "resumable": resumable,
        "cli": cli,
    }
    if legacy is not _MISSING:
        meta["legacy"] = legacy
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def comma_list(kind: type, count: int | None = None, example: str = "") -> Callable[[str], tuple]:
    """A parser of ``"a,b,..."`` into a tuple of ``kind`` (``count`` items, or at least one),
    raising one-line ``ValueError`` s the command line shows (``example``: e.g. ``"LO,HI"``)."""
    what = example or (f"{count} values" if count else "values") + " separated by commas"

    def parse(text: str) -> tuple:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        try:
            values = tuple(kind(t) for t in parts)
        except ValueError:
            raise ValueError(f"expected {what}, got {text!r}") from None
        if not values or (count is not None and len(values) != count):
            raise ValueError(f"expected {what}, got {text!r}")
        return values

    parse.__name__ = f"{kind.__name__}_list"
    return parse


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One option of a configuration tree: its path (``("train", "steps")``), its field and
    its resolved type."""

    path: tuple[str, ...]
    field: dataclasses.Field
    type: Any

    @property
    def key(self) -> str:
        """The dotted path, as saved options and resume rules name it (``train.steps``)."""
        return ".".join(self.path)

    @property
    def meta(self) -> dict:
        return dict(self.field.metadata)

    @property
    def flag(self) -> str:
        return self.meta.get("flag") or "--" + self.path[-1].replace("_", "-")


def leaves(cls: type, prefix: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every option of the dataclass ``cls``, nested dataclass fields walked in order."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from leaves(t, (*prefix, f.name))
        else:
            yield Leaf((*prefix, f.name), f, t)


def resumable_paths(cls: type) -> tuple[str, ...]:
    """The dotted paths of the options a resumed run of ``cls`` may change."""
    return tuple(leaf.key for leaf in leaves(cls) if leaf.meta.get("resumable"))


def legacy_values(cls: type) -> dict[str, Any]:
    """Dotted key -> the value runs saved before the option existed behaved as."""
    return {leaf.key: leaf.meta["legacy"] for leaf in leaves(cls) if "legacy" in leaf.meta}


def get_path(cfg: Any, path: Sequence[str]) -> Any:
    """The value at ``path`` of a configuration tree."""
    for p in path:
        cfg = getattr(cfg, p)
    return cfg


def set_path(cfg: Any, path: Sequence[str], value: Any) -> Any:
    """A copy of the configuration tree ``cfg`` with ``value`` at ``path``."""
    head, *rest = path
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: set_path(getattr(cfg, head), rest, value)})


def has_path(cls: type, path: Sequence[str]) -> bool:
    """Whether the dataclass ``cls`` has an option at ``path``."""
    return any(leaf.path == tuple(path) for leaf in leaves(cls))
