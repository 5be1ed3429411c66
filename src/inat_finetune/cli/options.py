"""The `train` and `compare` options, generated from TrainConfig's fields (each declared once).

A TrainConfig field is the single source of its option: the flag is ``--field-name`` (a bool
also gets ``--no-field-name``) unless the field's ``json_schema_extra`` names another, the help
is the field's description, and the default the help shows is the field's default (or, for a
default of None, the field's ``unset`` text). Which command offers which field is declared on the
field too (see the keys at the top of training/config.py): every field is a `train` option unless
it is set only in a --config file, and a `compare` option when it says so.

The option's own default is None, meaning "not given", so a value from --config, a recipe or a
resumed run is not overridden; load_config applies the field defaults after them.
Options that only the command line has (--config, --resume, --strategies...) stay declared in
the command's signature; ``config_options`` adds the generated ones around them.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer
from pydantic.fields import FieldInfo
from rich.markup import escape

from inat_finetune.runfiles import check_output_dir
from inat_finetune.training.config import (
    CLI_KEY,
    COMPARE_KEY,
    FLAG,
    UNSET,
    TrainConfig,
    load_config,
)

TRAIN = "train"
COMPARE = "compare"
Command = TypeVar("Command", bound=Callable[..., Any])


def _field(name: str) -> FieldInfo:
    return TrainConfig.model_fields[name]


def _extra(name: str) -> dict[str, Any]:
    extra = _field(name).json_schema_extra
    return extra if isinstance(extra, dict) else {}


def option_fields(command: str) -> list[str]:
    """The TrainConfig fields that ``command`` (train or compare) offers as options, in order."""
    on_cli = [n for n in TrainConfig.model_fields if _extra(n).get(CLI_KEY, True)]
    if command == TRAIN:
        return on_cli
    if command == COMPARE:
        return [n for n in on_cli if _extra(n).get(COMPARE_KEY, False)]
    raise ValueError(f"no generated options for command {command!r}")


def _value_type(name: str) -> type:
    """The Python type Typer converts the option's text to (a Literal's choices are text)."""
    annotation = _field(name).annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = args[0] if len(args) == 1 else str
    if typing.get_origin(annotation) is Literal:
        return type(typing.get_args(annotation)[0])
    return annotation  # type: ignore[return-value]


def flags(name: str) -> tuple[str, ...]:
    """The option's spelling: the field's ``flag``, else --field-name[/--no-field-name]."""
    if FLAG in _extra(name):
        return (_extra(name)[FLAG],)
    flag = "--" + name.replace("_", "-")
    if _value_type(name) is bool:
        return (f"{flag}/--no-{flag[2:]}",)
    return (flag,)


def format_default(value: Any) -> str:
    """A default as the help shows it: on/off for a switch, 0.001 and 10 for numbers."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def shown_default(name: str) -> str | None:
    """The default the help shows: the field's default, or its ``unset`` text for None."""
    default = _field(name).default
    if default is None:
        return _extra(name).get(UNSET)
    return format_default(default)


def help_text(name: str) -> str:
    """The field's description followed by ``[default: ...]`` from the field."""
    description = _field(name).description or ""
    default = shown_default(name)
    return description if default is None else f"{description} [default: {default}]".strip()


def field_option(name: str) -> Any:
    """``Annotated[type | None, typer.Option(...)]`` for the TrainConfig field ``name``."""
    # Typer renders help as rich markup, where "[default: 8]" is a style tag and vanishes.
    option = typer.Option(*flags(name), help=escape(help_text(name)))
    return Annotated[typing.Optional[_value_type(name)], option]  # noqa: UP045 - built at runtime


def config_options(command: str) -> Callable[[Command], Command]:
    """Give a command function the options of ``command``'s TrainConfig fields.

    The function declares its command-line-only options and takes the field options as
    ``**options`` (each None when not given). The first field option (--data) comes first, then
    the function's own options, then the other fields in TrainConfig's order.
    """

    def decorate(func: Command) -> Command:
        own = [
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in inspect.signature(func, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = [
            inspect.Parameter(
                n, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=field_option(n)
            )
            for n in option_fields(command)
        ]
        clash = {p.name for p in own} & {p.name for p in generated}
        if clash:
            raise TypeError(f"{func.__name__}: {sorted(clash)} are TrainConfig fields already")
        params = generated[:1] + own + generated[1:]
        func.__signature__ = inspect.Signature(params, return_annotation=None)  # type: ignore[attr-defined]
        return func

    return decorate


def config_from(config: Path | None, options: dict[str, Any]) -> TrainConfig:
    """The run's TrainConfig: defaults, recipe, the --config file, then the given options."""
    loaded = load_config(config, **options)
    check_output_dir(loaded.output, "--output")  # also when it came from the --config file
    return loaded
