"""Experiment settings as frozen dataclasses, and the command lines generated from them.

A config's fields are the run's settings. Each is declared with `setting`, which records
its one-line help and, for numbers, the `Range` it must lie in; the type annotation says
the rest: `bool` is a switch, `Literal[...]` lists the choices, `tuple[...]` takes one or
more values, `X | None` may be left unset. From these:

* `Config.__post_init__` checks every value (a `ConfigError` names the field and what it
  must be), and the subclass checks settings that contradict each other;
* `add_flags` declares one argparse flag per field, with the field's name (underscores
  kept), help, default and checks, so that a bad value on the command line is refused by
  argparse itself (exit status 2) before any compute;
* `Config.record` is what config.json keeps of it, every setting; those declared
  `may_change_on_resume` (the one list of what a resumed run may change, read by
  `Config.may_change_on_resume`) are the ones a resume does not refuse to change, and
  `Config.from_json` rebuilds the config of a run from its config.json.

A small helper over argparse rather than a library such as tyro: the flags stay exactly
those of the documentation (`--batch_size`, `--skip/--no-skip`, `--prior pixelcnn gated`),
argparse's messages and exit status stay, and nothing is added to the import time.
"""

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal

from lvm_jax import errors, files
from lvm_jax.train.state import MAY_CHANGE_ON_RESUME, may_change_on_resume


@dataclasses.dataclass(frozen=True)
class Range:
    """The values a number may take: `holds(value)` for a value of type `kind`, and at most
    `maximum` (the largest value its consumer represents: an int32 step count, a uint32
    seed)."""

    kind: type
    holds: Callable[[Any], bool]
    requirement: str  # completes "<value> is not ..."
    maximum: int | None = None

    def accepts(self, value) -> bool:
        return self.problem(value) is None

    def problem(self, value) -> str | None:
        """What `value` is not (completing "<value> is not ..."), or None when it is in range."""
        number = isinstance(value, self.kind) or (self.kind is float and isinstance(value, int))
        if not number or isinstance(value, bool):
            return self.requirement
        if self.kind is float:
            try:
                value = float(value)  # an integer too large for a float is out of every range
            except OverflowError:
                return self.requirement
        if not self.holds(value):
            return self.requirement
        if self.maximum is not None and value > self.maximum:
            return f"at most {self.maximum}"
        return None

    def parse(self, text: str):
        """An argparse `type=`: the value of `text`, or ArgumentTypeError (exit status 2)."""
        try:
            value = self.kind(text)
        except ValueError:  # not a number, or an integer of more than 4300 digits
            raise argparse.ArgumentTypeError(f"{text[:40]!r} is not {self.requirement}") from None
        problem = self.problem(value)
        if problem:
            raise argparse.ArgumentTypeError(f"{text} is not {problem}")
        return value


# Counts (epochs, steps, sizes) end up in int32 on the devices; seeds are uint32 keys.
INT32_MAX, UINT32_MAX = 2**31 - 1, 2**32 - 1
POSITIVE_INT = Range(int, lambda v: v > 0, "a positive integer", INT32_MAX)
NON_NEGATIVE_INT = Range(int, lambda v: v >= 0, "a non-negative integer", INT32_MAX)
SEED = Range(int, lambda v: v >= 0, "a non-negative integer", UINT32_MAX)
POSITIVE_FLOAT = Range(float, lambda v: 0 < v < math.inf, "a finite positive number")
NON_NEGATIVE_FLOAT = Range(float, lambda v: 0 <= v < math.inf, "a finite non-negative number")
POSITIVE_OR_INF = Range(float, lambda v: v > 0, "a positive number (inf allowed)")  # inf: no clip
DECAY_RATE = Range(float, lambda v: 0 <= v < 1, "a decay rate in [0, 1)")


def setting(default, help: str, range: Range | None = None, metavar: str | None = None,
            may_change_on_resume: bool = False):
    """A config field: its default, its one-line help (shown by --help with the default),
    the range a number must lie in, the flag's metavar, and whether a resumed run may change
    it (a setting of how long or how the process runs, or of what is done after training,
    rather than of what is trained): a resume records a change of such a setting in
    config.json's "changes", and refuses a change of any other."""
    return dataclasses.field(default=default,
                             metadata={"help": help, "range": range, "metavar": metavar,
                                       **(MAY_CHANGE_ON_RESUME if may_change_on_resume else {})})


def redefault(config: type, name: str, default):
    """Field `name` of `config` with another default (all else kept), for a subclass that
    changes a default: `ema_decay: float | None = redefault(Base, "ema_decay", 0.99)`."""
    return dataclasses.field(default=default, metadata=config.__dataclass_fields__[name].metadata)


def _unset_allowed(annotation) -> tuple[Any, bool]:
    """(the annotation without `| None`, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kinds = [k for k in typing.get_args(annotation) if k is not type(None)]
        return kinds[0], len(kinds) < len(typing.get_args(annotation))
    return annotation, False


def _element(annotation) -> tuple[Any, bool]:
    """(the type of each value, whether the field takes several)."""
    if typing.get_origin(annotation) is tuple:
        return typing.get_args(annotation)[0], True
    return annotation, False


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of the experiments' configs: checks every field against its declaration."""

    def __post_init__(self):
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            annotation, optional = _unset_allowed(hints[field.name])
            kind, several = _element(annotation)
            if value is None and optional:
                continue
            if several:
                if isinstance(value, str) or not isinstance(value, (tuple, list)) or not value:
                    self._refuse(field.name, value, "one or more values")
                value = tuple(value)
                object.__setattr__(self, field.name, value)  # a list from JSON or argparse
            for item in value if several else (value,):
                self._check(field, kind, item, value)

    def _check(self, field, kind, item, value) -> None:
        if typing.get_origin(kind) is Literal:
            if item not in typing.get_args(kind):
                self._refuse(field.name, value,
                             "one of " + ", ".join(map(str, typing.get_args(kind))))
        elif kind is bool:
            if not isinstance(item, bool):
                self._refuse(field.name, value, "True or False")
        elif field.metadata["range"] is not None:
            problem = field.metadata["range"].problem(item)
            if problem:
                self._refuse(field.name, value, problem)
        elif not isinstance(item, kind):
            self._refuse(field.name, value, f"a {kind.__name__}")

    def _refuse(self, name: str, value, requirement: str):
        shown = repr(value)
        if len(shown) > 60:  # a hostile value (a 4000-digit integer) stays one short line
            shown = f"{shown[:40]}... ({len(shown)} characters)"
        raise errors.ConfigError(f"{type(self).__module__}.{type(self).__qualname__}: {name}="
                                 f"{shown} is not {requirement}.")

    def replace(self, **changes):
        """A copy with `changes`, checked like the original."""
        return dataclasses.replace(self, **changes)

    def record(self) -> dict:
        """The settings as config.json keeps them: every field, by its name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def may_change_on_resume(cls) -> tuple[str, ...]:
        """The settings a resumed run may change (declared by `setting`)."""
        return may_change_on_resume(cls)

    @classmethod
    def from_saved(cls, saved: dict):
        """The config of a run from its saved settings (config.json's contents: `record`
        plus run facts): keys that name no field (the experiment, run facts, "changes")
        are left out, missing fields take their defaults.

        Raises:
          ConfigError: `saved` is no dict, or a value is out of its field's range or of
            the wrong type.
        """
        if not isinstance(saved, dict):
            raise errors.ConfigError(f"{cls.__module__}.{cls.__qualname__}: saved settings "
                                     "must be a JSON object.")
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{name: saved[name] for name in names if name in saved})

    @classmethod
    def from_json(cls, path: str):
        """The config of the finished run whose config.json is at `path`.

        Raises:
          ConfigError: in one line naming `path`: it cannot be read, is not a JSON object
            (truncated, nested too deep, an integer too long to read), or holds a setting
            that is out of range or of the wrong type.
        """
        saved = files.read_record(path, errors.ConfigError)
        try:
            return cls.from_saved(saved)
        except errors.ConfigError as err:
            raise errors.ConfigError(f"{path}: {err}") from None


def add_flags(parser: argparse.ArgumentParser, config: type[Config]) -> argparse.ArgumentParser:
    """Declares a flag `--<field>` for every field of `config`, with its help, default,
    type, range and choices."""
    hints = typing.get_type_hints(config)
    for field in dataclasses.fields(config):
        annotation, _ = _unset_allowed(hints[field.name])
        kind, several = _element(annotation)
        flag = {"help": field.metadata["help"], "default": field.default}
        if kind is bool:
            flag["action"] = argparse.BooleanOptionalAction if field.default else "store_true"
        else:
            if typing.get_origin(kind) is Literal:
                flag["choices"] = typing.get_args(kind)
            else:
                flag["type"] = field.metadata["range"].parse if field.metadata["range"] else kind
            if several:
                flag["nargs"] = "+"
                flag["default"] = None if field.default is None else list(field.default)
            if field.metadata["metavar"]:
                flag["metavar"] = field.metadata["metavar"]
        parser.add_argument(f"--{field.name}", **flag)
    return parser


def from_flags(config: type[Config], flags: argparse.Namespace):
    """The config the parsed `flags` name (flags of no field, such as --workdir, ignored)."""
    values = vars(flags)
    return config(**{field.name: values[field.name] for field in dataclasses.fields(config)})
