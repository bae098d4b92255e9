"""One exception type for user-facing errors: the CLI prints its message and exits non-zero, no traceback."""


class ZebraError(Exception):
    """Bad input or an impossible request, explained in the message."""
