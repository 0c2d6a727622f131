"""The one exception type for mistakes a user can fix (bad config, missing file, mismatched data).

The CLIs print these as a single line and exit with status 2 (`run_cli`); anything else is a bug
and keeps its traceback.
"""
import sys
from typing import Callable


class JanusError(Exception):
    """A user-facing error: the message alone must say what is wrong and where."""


class NonFiniteOutput(JanusError):
    """A model whose log-probabilities are NaN or inf (its weights diverged): validation counts
    it as no candidate for `best` instead of stopping the run."""


def run_cli(handler: Callable, args) -> None:
    """Run a command-line handler; a JanusError becomes one `error:` line and exit status 2."""
    try:
        handler(args)
    except JanusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
