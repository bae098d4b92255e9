"""One exception type for user-facing errors: the CLI prints its message and exits non-zero, no traceback."""


class ZebraError(Exception):
    """Bad input or an impossible request, explained in the message."""


def int_option(value, flag: str, minimum: int, other: str = "") -> int:
    """`value` as an int >= minimum, else a ZebraError naming `flag` (other: the alternative the option also
    accepts, for the message, e.g. "'auto'")."""
    try:
        n = int(str(value).strip())
    except ValueError:
        raise ZebraError(f"{flag} must be an integer{' or ' + other if other else ''}, not {value!r}") from None
    if n < minimum:
        raise ZebraError(f"{flag} must be >= {minimum}")
    return n
