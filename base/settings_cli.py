"""A settings class as command-line flags, the one way every service command does it.

pydantic-settings' own command-line source (`CliSettingsSource`) adds one flag per field to an existing
argparse (sub)parser and, given the parsed arguments, becomes the highest-priority source of the settings:
flags win over `<PREFIX>_<FIELD>` environment variables, which win over the defaults. A flag that is not
given stays absent, so the environment still applies.

    parser = subparsers.add_parser("serve-bank")
    add_settings_flags(parser, BankServerSettings)       # --max-nodes-per-call, --readahead/--no-readahead, ...
    args = parser.parse_args()                           # (or the whole CLI's parser)
    settings = settings_from_args(BankServerSettings, args)
"""

from __future__ import annotations

import argparse
from typing import TypeVar

from pydantic import ValidationError
from pydantic_settings import BaseSettings, CliSettingsSource

S = TypeVar("S", bound=BaseSettings)

_DEST = "settings_source"  # where the parser keeps (its source, its prog) in the parsed arguments


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type[BaseSettings]) -> None:
    """One flag per field of `settings_cls` on `parser`: `max_nodes_per_call` -> `--max-nodes-per-call`,
    booleans as `--x` / `--no-x`; the help is the field's docstring with its default and its variable."""
    source: CliSettingsSource[BaseSettings] = CliSettingsSource(
        settings_cls, root_parser=parser, cli_kebab_case=True, cli_implicit_flags=True,
        cli_hide_none_type=True, cli_show_env_vars=True)
    parser.set_defaults(**{_DEST: (source, parser.prog)})


def settings_from_args(settings_cls: type[S], args: argparse.Namespace) -> S:
    """The settings from parsed arguments of a parser prepared by `add_settings_flags(parser, settings_cls)`.

    Values the settings refuse end the command (SystemExit) with the validation errors, named by field."""
    source, prog = getattr(args, _DEST)
    if source.settings_cls is not settings_cls:
        raise TypeError(f"the parser's flags are {source.settings_cls.__name__}'s, not {settings_cls.__name__}'s")
    try:
        return settings_cls(_cli_settings_source=source(parsed_args=args))
    except ValidationError as exc:
        raise SystemExit(f"{prog}: invalid settings:\n{exc}") from None
