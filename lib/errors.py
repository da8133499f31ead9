"""User-facing errors: one line that names the file or key and what was expected."""
from __future__ import annotations

import errno
import functools
import sys

# errno values only a write can raise: a disk or quota full, a file over its size limit, a read-only mount
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class UserError(Exception):
    """Bad input (data or params).  The message is a single line shown to the user as is."""


class DataError(UserError):
    """A dataset file or folder is missing, unreadable or not what its layout promises."""


class ConfigError(UserError):
    """A params key is unknown, missing or of the wrong type or value."""


class OutputError(UserError):
    """An output could not be written (disk full, file too large, a file where a folder must be)."""


def exit_on_user_error(main):
    """Decorator for stage entry points: a UserError becomes ``error: <message>`` and exit code 2.

    So does a full disk met by a write outside the atomic writers of lib.io (which name the output
    themselves), e.g. DVCLive's training curves.
    """

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            raise SystemExit(2) from None
        except OSError as err:
            if err.errno not in WRITE_ERRNOS:
                raise
            print(f"error: {err.filename or 'an output file'}: could not be written ({err.strerror})",
                  file=sys.stderr)
            raise SystemExit(2) from None

    return wrapper
