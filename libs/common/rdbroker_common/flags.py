"""Command-line flags for a settings class: `--foo-bar` for every field `foo_bar`, over `RDBROKER_FOO_BAR`.

One rule for every service, so an operator can set anything either way and flags always win over the
environment. Fields holding credentials (API tokens) can be kept out of the flags: a command line is
visible to every user of the host in `ps`.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

from pydantic import SecretStr, ValidationError
from pydantic_settings import BaseSettings

S = TypeVar("S", bound=BaseSettings)


def flag(field: str) -> str:
    return "--" + field.replace("_", "-")


def add_settings_flags(
    parser: argparse.ArgumentParser,
    cls: type[BaseSettings],
    *,
    only: Iterable[str] | None = None,
    env_only: Iterable[str] = (),
) -> None:
    """Add a flag per field of `cls` (or of `only`); a flag left out keeps the env value or default."""
    prefix = str(cls.model_config.get("env_prefix", ""))
    names = list(only) if only is not None else list(cls.model_fields)
    hidden = set(env_only)
    for name in names:
        if name in hidden:
            continue
        info = cls.model_fields[name]
        env = f"{prefix}{name}".upper()
        default = "" if info.default_factory is not None else f", default {_shown(info.default)}"
        help_ = f"{info.description + ' ' if info.description else ''}[{env}{default}]"
        if info.annotation is bool and info.default is True:  # on by default: `--no-<name>` turns it off
            parser.add_argument(flag(name), dest=name, action=argparse.BooleanOptionalAction, help=help_)
        elif info.annotation is bool:
            parser.add_argument(flag(name), dest=name, action="store_const", const=True, help=help_)
        else:
            parser.add_argument(flag(name), dest=name, metavar="VALUE", help=help_)
    parser.set_defaults(**dict.fromkeys(names))


def settings_from(cls: type[S], args: argparse.Namespace) -> S:
    """The settings: flags given in `args`, then the environment, then defaults. Raises ValidationError."""
    given: dict[str, Any] = {k: v for k, v in vars(args).items() if v is not None and k in cls.model_fields}
    return cls(**given)


def parse_settings(
    cls: type[S],
    argv: Sequence[str],
    *,
    prog: str,
    description: str,
    env_only: Iterable[str] = (),
) -> S:
    """Parse `argv` (every field a flag) into settings. argparse exits 2 on an unknown flag."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_settings_flags(parser, cls, env_only=env_only)
    return settings_from(cls, parser.parse_args(list(argv)))


def settings_errors(exc: ValidationError) -> str:
    """One line per invalid setting, without the values given: pydantic's own text quotes the input
    (for a settings-wide check, every setting's value, the database URL included)."""
    lines = []
    for error in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(part) for part in error.get("loc", ()))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        lines.append(f"  {where}: {message}" if where else f"  {message}")
    return "\n".join(lines)


def _shown(value: object) -> str:
    # Only defaults written in the code are shown, never a value from the environment.
    if isinstance(value, SecretStr):
        value = value.get_secret_value()
    return repr(value)
