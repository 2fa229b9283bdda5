"""How every command-line tool starts and stops: `run(main)` in place of `absl.app.run(main)`.

A user's mistake ends in one line on stderr and exit status 2, before any compilation where the
input allows it: a flag or config override that does not parse (a misspelt field, `:seed=abc`), or
a `UserError` raised by the tool. Any other exception is a
bug and keeps its traceback. A training run stopped by SIGTERM or Ctrl-C saves its state first
(`loop.train_stage`) and exits with the signal's status: 0 for SIGTERM (a preemption to resume
from), 130 for Ctrl-C.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Callable, Sequence

from absl import app, flags

from unialign_jax import logs
from unialign_jax.errors import Interrupted, UserError

USAGE_HINT = "run with --helpfull for the flags"


def fail(message: str, hint: str = "") -> None:
    """Prints `error: message` (and `hint: ...`) to stderr and exits 2."""
    print(f"error: {message}", file=sys.stderr)
    if hint:
        print(f"hint: {hint}", file=sys.stderr)
    sys.exit(2)


def _one_line(error: BaseException) -> str:
    """The message of `error` on one line. ml_collections reports a misspelt field as an
    AttributeError whose text is the repr of a KeyError's message (undone here), and a config file
    that fails as a message ending in the traceback's last line (kept, without the exception's
    module path) or in the OS error."""
    text = str(error).strip()
    if isinstance(error, (AttributeError, KeyError)) and text[:1] in "'\"":
        try:
            text = str(ast.literal_eval(text))
        except (SyntaxError, ValueError):
            pass
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if "Traceback (most recent call last):" in lines or (isinstance(error, OSError) and len(lines) > 1):
        lines = [re.sub(r"^[\w.]+(Error|Exception): ", "", lines[-1])]
    return "; ".join(lines)


def _parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with every parse failure (config files run their `get_config` here, and
    overrides are applied here) turned into an `error:` line."""
    try:
        args = flags.FLAGS(argv)
        for name in list(flags.FLAGS):  # a config file that failed to load stands in as an _ErrorConfig
            value = flags.FLAGS[name].value
            if type(value).__name__ == "_ErrorConfig":
                value._ReportError()  # raises the load failure
        return args
    except UserError as error:
        fail(_one_line(error), error.hint or USAGE_HINT)
    except (flags.Error, ValueError, TypeError, AttributeError, KeyError, OSError) as error:
        fail(_one_line(error), USAGE_HINT)
    raise AssertionError("unreachable")


def _guarded(main: Callable, *args) -> object:
    """`main(*args)`, with a `UserError`, a stop on a signal and Ctrl-C ended as this module says."""
    try:
        return main(*args)
    except UserError as error:
        fail(_one_line(error), error.hint)
    except Interrupted as stop:
        print(stop, file=sys.stderr)
        sys.exit(stop.exit_code)
    except KeyboardInterrupt:
        print("interrupted (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


def run(main: Callable[[list[str]], object]) -> None:
    """Runs `main(argv)` as `absl.app.run` does (logging set up first, `logs.setup`), with the error
    handling of this module."""
    logs.setup()
    app.run(lambda argv: _guarded(main, argv), flags_parser=_parse_flags)


def guard(main: Callable[[], int | None]) -> None:
    """For a CLI that parses its own arguments: exits with `main()`'s status, errors handled as in `run`."""
    logs.setup()
    sys.exit(_guarded(main) or 0)
