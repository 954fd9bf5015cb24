"""Sizes as qemu-img parses and prints them."""

from __future__ import annotations

import math
import re

from .errors import QimgError

INT64_MAX = (1 << 63) - 1
SUFFIXES = {"b": 0, "k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}
_SIZE_RE = re.compile(r"\s*(0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]*)?)([a-zA-Z]?)\Z")

SIZE_HELP = (
    "Invalid image size specified. You may use k, M, G, T, P or E suffixes for\n"
    "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes."
)


def parse_size(text: str, default_suffix: str = "b") -> int | None:
    """Parse a qemu size ("1G", "1.5k", "0x1000", "512b"); None when malformed.

    Like qemu_strtosz: hex takes no fraction (a suffix still works, with qemu's deprecation
    warning), and a fraction needs a suffix unless it is zero ("1.0" is 1, "1.5" is invalid).
    """
    m = _SIZE_RE.match(text)
    if not m:
        return None
    number, suffix = m.groups()
    suffix = (suffix or default_suffix).lower()
    if suffix not in SUFFIXES:
        return None
    shift = SUFFIXES[suffix]
    if number[:2].lower() == "0x":
        if m.group(2):
            import warnings

            from .errors import QimgWarning

            # qemu-img still accepts this, with a warning
            warnings.warn(f"Using a multiplier suffix on hex numbers is deprecated: {text}", QimgWarning,
                          stacklevel=2)
        value = int(number, 16) << shift
    elif "." in number:
        whole, _, frac = number.partition(".")
        # qemu allows a fraction only with a real multiplier (not bytes), unless it is zero
        if shift == 0 and frac.strip("0"):
            return None
        value = int(whole or "0") << shift
        if frac:
            value += int(frac) * (1 << shift) // (10 ** len(frac))
    else:
        value = int(number) << shift
    if value > INT64_MAX:
        raise QimgError("Invalid image size specified. Must be between 0 and 9223372036854775807.", )
    return value


def parse_image_size(text: str) -> int:
    """An image size for create/resize: qemu-img's messages on error."""
    if text.lstrip().startswith("-"):
        raise QimgError(SIZE_HELP)
    value = parse_size(text)
    if value is None:
        raise QimgError(SIZE_HELP)
    return value


def size_to_str(value: int) -> str:
    """qemu's size_to_str: "%0.3g %sB" with binary prefixes, switching at 1000."""
    suffixes = ["", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei"]
    _m, exp = math.frexp(value / (1000.0 / 1024.0))
    i = int((exp - 1) / 10)  # C division truncates toward zero
    i = max(0, min(i, len(suffixes) - 1))
    div = 1 << (i * 10)
    return "%0.3g %sB" % (value / div, suffixes[i])


def round_up(value: int, align: int) -> int:
    """Round ``value`` up to a multiple of ``align``."""
    return (value + align - 1) // align * align


def div_round_up(value: int, align: int) -> int:
    return (value + align - 1) // align


def cvtnum(name: str, value: int | str, minimum: int = 0, maximum: int = INT64_MAX) -> int:
    """A size argument checked as qemu-img's cvtnum does (messages name the argument): an int, or a
    string with an optional k/M/G/T/P/E suffix."""
    from .errors import InvalidArgument, QimgError

    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InvalidArgument(f"Invalid {name} specified: {value!r}")
    if isinstance(value, int):
        number: int | None = value
    else:
        try:
            number = parse_size(value)
        except QimgError:
            number = maximum + 1  # out of range
        if number is None:
            raise QimgError(f"Invalid {name} specified. You may use k, M, G, T, P or E suffixes for\n"
                            "qimg: kilobytes, megabytes, gigabytes, terabytes, petabytes and exabytes.")
    if number < minimum or number > maximum:
        raise QimgError(f"Invalid {name} specified. Must be between {minimum} and {maximum}.")
    return number
