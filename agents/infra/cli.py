"""Flags, run names and bad-input handling shared by every script (no torch, numpy or gymnasium imports here, so
`sobirl/sweep.py --help` and `sobirl/plot.py` start fast).

Every hyperparameter is a dataclass field declared with `flag(default, help)`; `parse_args` turns the dataclass
into an argparse parser (``--snake-case`` names, booleans as ``--x/--no-x``), so ``--help`` lists every default.
An Args class checks its own values in `validate()`; subclasses extend it and call `super().validate()`.
"""

from __future__ import annotations

import argparse
import contextvars
import dataclasses
import decimal
import math
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from wrappers.errors import InvalidEnvError

T = TypeVar("T")


class UsageError(Exception):
    """Bad input from the user: reported as one line on stderr with exit status 2, never a traceback."""


# Set by check_flags: parsers raise UsageError instead of exiting, and a run stops once its flags are validated.
CHECKING_FLAGS: contextvars.ContextVar[bool] = contextvars.ContextVar("checking_flags", default=False)


class FlagsChecked(Exception):
    """Raised by a run's launch under check_flags, once its flags are parsed and validated; nothing was built."""


def check_flags(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str]) -> None:
    """Parse and validate `argv` as the script's `main` would, then stop before anything is built or written; bad
    flags raise UsageError (sobirl/sweep.py checks every job this way before starting any)."""
    token = CHECKING_FLAGS.set(True)
    try:
        main(list(argv))
    except FlagsChecked:
        return
    finally:
        CHECKING_FLAGS.reset(token)
    raise RuntimeError(f"{main.__module__}.main ran to the end under check_flags: it does not go through launch")


def flag(default: Any, help: str, choices: Sequence[Any] | None = None) -> Any:
    """Declare a command-line flag on an Args dataclass."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices})


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (naming the flag) and exit status 2, without the usage dump."""

    def error(self, message: str):
        if CHECKING_FLAGS.get():
            raise UsageError(message)
        self.exit(2, f"error: {message}\n")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, except where there is none (a required flag, None, an empty string) or
    where the help already says what the default means."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default in (None, "") or "(default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(args_cls: type, description: str | None = None) -> argparse.ArgumentParser:
    parser = OneLineErrorParser(description=description, formatter_class=DefaultsHelpFormatter)
    for f in dataclasses.fields(args_cls):
        help_text = f.metadata.get("help", "")
        if f.name == "resume" and hasattr(args_cls, "RESUMABLE"):
            # Listed from the class itself, so --help never disagrees with what a resume accepts.
            help_text += f"; a resumed run may change only {', '.join(sorted(map(flag_name, args_cls.RESUMABLE)))}"
        if isinstance(f.default, bool):
            parser.add_argument(
                flag_name(f.name), dest=f.name, default=f.default, help=help_text, action=argparse.BooleanOptionalAction
            )
        else:
            parser.add_argument(
                flag_name(f.name),
                dest=f.name,
                default=f.default,
                help=help_text,
                type=_flag_type(f.default),
                choices=f.metadata.get("choices"),
            )
    return parser


# Integer flags end up in int64 tensors and numpy arrays (step counters, seeds, sizes).
INT64_MAX = 2**63 - 1


def integer(text: str) -> int:
    """An argparse type for integers that also accepts 1e6-style spellings, how RL budgets are usually written.
    The value is read exactly (4.3e6 is 4300000 and 1e17 + 1 stays odd: no float rounding) and must fit a
    64-bit integer."""
    try:
        value = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not value.is_finite() or value != value.to_integral_value():
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}")
    if abs(value) > INT64_MAX:
        raise argparse.ArgumentTypeError(f"{text} is out of range: at most {INT64_MAX:.3g} (a 64-bit integer)")
    return int(value)


def require_folder_name(args: Any, *names: str) -> None:
    """Folder flags must name a folder: an empty one would put the run's files in the current directory."""
    for name in names:
        value = getattr(args, name)
        require(bool(value.strip()), f"{flag_name(name)} must name a folder, got {value!r}")


def _flag_type(default: Any) -> Callable[[str], Any]:
    if isinstance(default, int):
        return integer
    if isinstance(default, float):
        return float
    return str


def parse_args(args_cls: type[T], argv: Sequence[str] | None = None, description: str | None = None) -> T:
    """Parse argv into an `args_cls` instance; argparse itself exits with status 2 on unknown flags."""
    namespace = build_parser(args_cls, description).parse_args(argv)
    for name, value in vars(namespace).items():
        # No hyperparameter here means anything as nan or inf; refuse them before any validation compares them.
        if isinstance(value, float):
            require(math.isfinite(value), f"{flag_name(name)} must be a finite number, got {value}")
    return args_cls(**vars(namespace))


def explicit_flags(args_cls: type, argv: Sequence[str] | None) -> set[str]:
    """Names of the fields whose flags appear on the command line (a resumed run keeps its saved values otherwise)."""
    parser = build_parser(args_cls)
    parser.argument_default = argparse.SUPPRESS
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_known_args(argv)[0]))


def require(condition: bool, message: str) -> None:
    """Raise a UsageError with `message` (which names the flag or value) unless `condition` holds."""
    if not condition:
        raise UsageError(message)


def require_positive(args: Any, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        require(value > 0, f"{flag_name(name)} must be positive, got {value}")


def require_non_negative(args: Any, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        require(value >= 0, f"{flag_name(name)} must be non-negative, got {value}")


def run_cli(main: Callable[[Sequence[str] | None], Any], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; bad input becomes `error: <message>` on stderr and exit status 2."""
    try:
        main(argv)
    except (UsageError, InvalidEnvError) as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def make_run_name(env_id: str, exp_name: str, seed: int) -> str:
    # "ALE/Pong-v5" or "MinAtar/Breakout-v1" would otherwise nest the run one directory deeper.
    return f"{env_id.replace('/', '-')}__{exp_name}__{seed}__{int(time.time())}"


def hyperparameter_table(args: Any) -> str:
    rows = "\n".join(f"|{key}|{value}|" for key, value in vars(args).items())
    return "|param|value|\n|-|-|\n" + rows
