"""User-facing errors: one line that names the file or key and what was expected."""
from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """Bad input (data or params).  The message is a single line shown to the user as is."""


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or not what its layout promises."""


class ConfigError(UserError):
    """A params key is unknown, missing or of the wrong type or value."""


def exit_on_user_error(main):
    """Decorator for stage entry points: a UserError becomes ``error: <message>`` and exit code 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
