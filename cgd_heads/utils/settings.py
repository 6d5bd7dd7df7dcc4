"""Settings written once: a dataclass field carries its default, help text and valid choices, and the command-line
options are generated from it, so the library, the CLI and the saved JSON cannot drift apart.

Example:
    >>> @dataclass
    ... class Config:
    ...     lr: float = setting(1e-4, 'learning rate')
    ...     sched: str = setting('step', 'schedule', choices=('step', 'cosine'))
    >>> parser = argparse.ArgumentParser()
    >>> add_options(parser, Config)
    >>> config_from_args(Config, parser.parse_args(['--lr', '0.01']))
    Config(lr=0.01, sched='step')
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Type, TypeVar, Union

__all__ = ['setting', 'with_default', 'add_options', 'config_from_args', 'count_or_fraction', 'positive_int']

T = TypeVar('T')


def setting(default: Any, help: str, choices: Optional[Sequence[Any]] = None, flag: Optional[str] = None,
            parse: Optional[Callable[[str], Any]] = None, cli: bool = True) -> Any:
    """A dataclass field that also describes its command-line option.

    Args:
        default: The default value.
        help: One line for ``--help``.
        choices: The valid values (None among them is spelt ``none`` on the command line).
        flag: The option's name when it is not ``--`` + the field name with ``-`` for ``_``.
        parse: Converts the option's text (default: the field's type).
        cli: False keeps the field out of the command line (set by the program instead).
    """
    return dataclasses.field(default=default, metadata={
        'help': help, 'choices': tuple(choices) if choices is not None else None, 'flag': flag, 'parse': parse,
        'cli': cli})


def with_default(config_cls: type, name: str, default: Any) -> Any:
    """The field ``name`` of ``config_cls`` (help, choices...) with another default, for a subclass."""
    base = next(f for f in dataclasses.fields(config_cls) if f.name == name)
    return dataclasses.field(default=default, metadata=base.metadata)


def positive_int(text: str) -> int:
    """An option's text as an int >= 1 (image sizes, counts); argparse.ArgumentTypeError otherwise."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a whole number (a positive int is needed)') from None
    if value < 1:
        raise argparse.ArgumentTypeError(f'{text!r}: a positive int is needed')
    return value


def count_or_fraction(text: str) -> Union[int, float]:
    """``'20'`` -> 20 (a count), ``'0.2'`` -> 0.2 (a fraction): values >= 1 are counts and must be whole numbers.

    Raises:
        argparse.ArgumentTypeError: ``text`` is not a number, is negative or not finite, or is a count with a
            fractional part (``'1.5'`` would otherwise silently mean 1 class).
    """
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number: give a fraction in [0, 1) or a class count') \
            from None
    if not math.isfinite(value) or value < 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f'{text!r}: give a fraction in [0, 1) (e.g. 0.2) or a whole class count '
                                         f'(e.g. 20)')
    return int(value) if value >= 1 else value


def _none_or(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        return None if text == 'none' else parse(text)
    convert.__name__ = getattr(parse, '__name__', 'value')  # argparse names the type in its error message
    return convert


def _is_optional(hint: Any) -> bool:
    return typing.get_origin(hint) is Union and type(None) in typing.get_args(hint)


def _base_type(hint: Any) -> Any:
    """``Optional[int]`` -> int; plain types as they are."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) is Union and len(args) == 1 else hint


def add_options(parser: argparse.ArgumentParser, config_cls: type, only: Optional[Iterable[str]] = None,
                defaults: Optional[Dict[str, Any]] = None) -> None:
    """Add one option per field of ``config_cls`` (those in ``only``, if given) with ``dest`` = the field name.

    Booleans become ``--name`` / ``--no-name`` flags; ``Optional`` fields and choices including None accept ``none``.
    ``defaults`` overrides the dataclass defaults (a program with other defaults, such as the demo).
    """
    hints = typing.get_type_hints(config_cls)
    defaults = defaults or {}
    wanted = set(only) if only is not None else None
    for f in dataclasses.fields(config_cls):
        meta = f.metadata
        if not meta.get('cli', False) or (wanted is not None and f.name not in wanted):
            continue
        flag = meta['flag'] or '--' + f.name.replace('_', '-')
        default = defaults.get(f.name, f.default)
        kind = _base_type(hints[f.name])
        if kind is bool:
            # --name / --no-name: a recipe or program may default a flag to on, and the user can still turn it off
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                                help=meta['help'])
            continue
        parse = meta['parse'] or kind
        choices = meta['choices']
        if (choices is not None and None in choices) or _is_optional(hints[f.name]):
            parse = _none_or(parse)  # 'none' unsets a default (a recipe's weights source, head_lr ...)
        parser.add_argument(flag, dest=f.name, type=parse, default=default, choices=choices, help=meta['help'],
                            metavar='{' + ','.join('none' if c is None else str(c) for c in choices) + '}'
                            if choices else None)


def config_from_args(config_cls: Type[T], args: argparse.Namespace, **overrides: Any) -> T:
    """An instance of ``config_cls`` from the options :func:`add_options` added, plus ``overrides``."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(overrides)
    return config_cls(**values)
