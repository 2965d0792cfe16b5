"""The one exception type for mistakes a user can fix.

The CLI turns a `FatezeroError` into a single line on stderr and a stable exit
code; anything else is a bug and keeps its traceback.
"""


class FatezeroError(Exception):
    """Bad input or an unusable resource, reported to the user as one line."""

    exit_code = 2


class Interrupted(FatezeroError):
    """Ctrl-C: every file is written atomically, so nothing half-written is left behind."""

    exit_code = 130


class NotBuiltYet(FatezeroError):
    """A command whose engine is not available in this version."""

    exit_code = 2
