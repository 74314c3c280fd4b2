"""One declaration per setting: its flag, its NANODIST_* variable, its default and its text form.

A dataclass field declared with `setting(...)` carries all of it, so the
command-line flags, the environment variables, a TOML file and the command
line the launcher passes on to its workers are derived from the same place
and cannot drift apart:

    @dataclass(kw_only=True)
    class Config:
        epochs: int = setting(10, flag="--epochs", help="passes over the data")

    add_flags(parser, Config)            # --epochs, default from NANODIST_EPOCHS
    config = from_args(Config, args)     # back to a Config
    to_argv(config)                      # ["--epochs=10"], parsed back to the same Config

The field's annotation picks the text form: str, int, float, bool (a switch),
`str | None`, and comma-separated `tuple[int, ...]` and `tuple[str, ...]`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


class SettingError(ValueError):
    """A value from the environment or a settings file cannot be read; the message names where it came from."""


@dataclass(frozen=True)
class Setting:
    flag: str  # "--batch-size"
    help: str
    env: str | None  # the variable's name without NANODIST_, or None when there is none
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        """The flag's argparse destination, which is also its key in a settings file."""
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def variable(self) -> str | None:
        return f"NANODIST_{self.env}" if self.env else None


def setting(
    default: Any = dataclasses.MISSING,
    *,
    flag: str,
    help: str,
    env: str | bool = True,
    choices: tuple[str, ...] = (),
) -> Any:
    """A dataclass field with its flag. env: True derives NANODIST_<FLAG> from the flag, a string names
    the variable (without NANODIST_), False means no variable. Leave out the default for a required setting."""
    name = flag.removeprefix("--").replace("-", "_").upper() if env is True else (env or None)
    return dataclasses.field(default=default, metadata={"setting": Setting(flag, help, name, choices)})


@dataclass(frozen=True)
class Declared:
    """One declared field: its name in the dataclass, its flag, and how its value reads and prints."""

    name: str
    setting: Setting
    default: Any  # dataclasses.MISSING when the setting is required
    switch: bool  # a bool: the flag takes no value
    parse: Callable[[str], Any]
    format: Callable[[Any], str]


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _strings(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def _number(kind: type[int] | type[float]) -> Callable[[str], Any]:
    def parse(text: str) -> int | float:
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}"
            ) from None

    return parse


def _switch(text: str) -> bool:
    if text.strip().lower() in _TRUE:
        return True
    if text.strip().lower() in _FALSE:
        return False
    raise argparse.ArgumentTypeError(f"expected 1 or 0 (true or false), got {text!r}")


def _join(values: Iterable[object]) -> str:
    return ",".join(str(v) for v in values)


# The annotation of a field -> (text to value, value to text).
_CODECS: dict[object, tuple[Callable[[str], Any], Callable[[Any], str]]] = {
    str: (str, str),
    str | None: (str, str),
    int: (_number(int), str),
    float: (_number(float), repr),
    bool: (_switch, lambda v: "1" if v else "0"),
    tuple[int, ...]: (_ints, _join),
    tuple[str, ...]: (_strings, _join),
}


_declared: dict[type, tuple[Declared, ...]] = {}


def declared(cls: type) -> tuple[Declared, ...]:
    """The fields of `cls` declared with setting(), in order."""
    if cls not in _declared:
        _declared[cls] = _declare(cls)
    return _declared[cls]


def _declare(cls: type) -> tuple[Declared, ...]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        s = f.metadata.get("setting")
        if not isinstance(s, Setting):
            continue
        if hints[f.name] not in _CODECS:
            raise TypeError(f"{cls.__name__}.{f.name}: settings of type {hints[f.name]} cannot be read from text")
        parse, fmt = _CODECS[hints[f.name]]
        found.append(Declared(f.name, s, f.default, hints[f.name] is bool, parse, fmt))
    return tuple(found)


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    exclude: Iterable[str] = (),
    environment: bool = True,
    defaults: bool = True,
) -> None:
    """Add a flag for every setting of `cls` except the fields named in `exclude`.

    environment: a set NANODIST_* variable replaces the declared default (and the help names it).
    defaults: False leaves a flag that was not given out of the parsed namespace, so that the
    caller can lay other sources (a settings file) beneath the command line.
    """
    skip = set(exclude)
    for d in declared(cls):
        if d.name in skip:
            continue
        s = d.setting
        default = d.default
        raw = os.environ.get(s.variable) if environment and s.variable else None
        if raw is not None:
            try:
                default = d.parse(raw)
            except argparse.ArgumentTypeError as error:
                parser.error(f"{s.variable}={raw!r}: {error}")
        notes = []
        shown = "" if d.switch or d.default is dataclasses.MISSING or d.default is None else d.format(d.default)
        if shown:
            notes.append(f"default {shown}")
        if environment and s.variable:
            notes.append(f"env {s.variable}")
        text = s.help + (f" ({'; '.join(notes)})" if notes else "")
        options: dict[str, Any] = {"dest": s.dest, "help": text.replace("%", "%%")}
        if not defaults:
            options["default"] = argparse.SUPPRESS
        elif default is dataclasses.MISSING:
            options["required"] = True
        else:
            options["default"] = default
        if d.switch:
            parser.add_argument(s.flag, action="store_true", **options)
        else:
            parser.add_argument(s.flag, type=d.parse, choices=s.choices or None, **options)


def build(cls: type[T], values: Mapping[str, Any], **fields: Any) -> T:
    """An instance of `cls` from values keyed by flag destination (a parsed namespace's or a settings
    file's); keys that are not settings of `cls` are ignored, absent ones keep their default. `fields`,
    by field name, win over both."""
    chosen = {d.name: values[d.setting.dest] for d in declared(cls) if d.setting.dest in values}
    return cls(**{**chosen, **fields})


def from_args(cls: type[T], args: argparse.Namespace, **fields: Any) -> T:
    return build(cls, vars(args), **fields)


def from_environment(cls: type[T], **fields: Any) -> T:
    """An instance of `cls` from the NANODIST_* variables of its settings (declared defaults for unset ones),
    as a process started without flags (a container, a script under `nanodist run`) sees them."""
    values = {}
    for d in declared(cls):
        raw = os.environ.get(d.setting.variable) if d.setting.variable else None
        if raw is None or d.name in fields:
            continue
        try:
            values[d.setting.dest] = d.parse(raw)
        except argparse.ArgumentTypeError as error:
            raise SettingError(f"{d.setting.variable}={raw!r}: {error}") from None
    missing = [
        d.setting.variable or d.setting.flag
        for d in declared(cls)
        if d.default is dataclasses.MISSING and d.setting.dest not in values and d.name not in fields
    ]
    if missing:
        raise SettingError(f"{', '.join(missing)} must be set")
    return build(cls, values, **fields)


def to_argv(config: object, *, exclude: Iterable[str] = ()) -> list[str]:
    """The flags that give `config` back when parsed; `--flag=value`, so that a value may start with '-'."""
    skip = set(exclude)
    argv = []
    for d in declared(type(config)):
        value = getattr(config, d.name)
        if d.name in skip or value is None:
            continue
        if d.switch:
            argv += [d.setting.flag] if value else []
        else:
            argv.append(f"{d.setting.flag}={d.format(value)}")
    return argv


def to_environment(config: object) -> dict[str, str]:
    """The NANODIST_* variables that give `config` back through from_environment (settings without a
    variable, and unset optional ones, are left out)."""
    variables = {}
    for d in declared(type(config)):
        value = getattr(config, d.name)
        if d.setting.variable and value is not None:
            variables[d.setting.variable] = ("1" if value else "0") if d.switch else d.format(value)
    return variables


def from_file(cls: type, values: Mapping[str, object], source: str) -> dict[str, Any]:
    """Values of a settings file (TOML: numbers, strings, booleans, arrays), keyed by flag destination,
    read as their flags would be. Raises SettingError naming the file and the key."""
    by_dest = {d.setting.dest: d for d in declared(cls)}
    unknown = sorted(set(values) - set(by_dest))
    if unknown:
        raise SettingError(f"{source}: unknown settings {unknown}; known: {sorted(by_dest)}")
    parsed = {}
    for key, value in values.items():
        d = by_dest[key]
        if d.switch and not isinstance(value, bool):
            raise SettingError(f"{source}: {key} must be true or false, got {value!r}")
        text = _join(value) if isinstance(value, list) else str(value)
        try:
            parsed[key] = value if d.switch else d.parse(text)
        except argparse.ArgumentTypeError as error:
            raise SettingError(f"{source}: {key}: {error}") from None
        if d.setting.choices and parsed[key] not in d.setting.choices:
            raise SettingError(f"{source}: {key} must be one of {list(d.setting.choices)}, got {value!r}")
    return parsed
