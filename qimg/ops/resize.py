"""resize: change an image's virtual size (absolute or +/- relative), with qemu-img's rules."""

from __future__ import annotations

from ..errors import QimgError, UsageError

PREALLOC_MODES = ("off", "metadata", "falloc", "full")
SIZE_ERROR = ("Parameter 'size' expects a non-negative number below 2^64\n"
              "Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n"
              "and exabytes, respectively.")
SHRINK_ERROR = ("Use the --shrink option to perform a shrink operation.\n"
                "qimg: warning: Shrinking an image will delete all data beyond the shrunken image's end. "
                "Before performing such an operation, make sure there is no important data there.")


def parse_resize_size(text: str) -> tuple[int, int]:
    """(sign, bytes): sign is 0 for an absolute size, +1/-1 for a relative one."""
    from ..units import parse_size

    sign = 0
    body = text
    if text[:1] in ("+", "-"):
        sign = 1 if text[0] == "+" else -1
        body = text[1:]
    try:
        value = parse_size(body)
    except UsageError:
        value = None
    if value is None:
        raise QimgError(SIZE_ERROR)
    return sign, value


def resize(filename: str, size_text: str, fmt: str | None = None, shrink: bool = False,
           prealloc: str | None = None, options: dict | None = None, warn=None, policy=None) -> int:
    """Resize; returns the new virtual size."""
    if prealloc is not None and prealloc not in PREALLOC_MODES:
        raise QimgError(f"Invalid preallocation mode '{prealloc}'")
    sign, value = parse_resize_size(size_text)
    from ..core.chain import open_for_command as open_chain

    chain = open_chain(filename, fmt, writable=True, options=options, warn=warn, policy=policy)  # as qemu-img
    drv = chain.top
    try:
        current = drv.virtual_size
        total = current + sign * value if sign else value
        if total <= 0:
            raise QimgError("New image size must be positive")
        if total < current and prealloc not in (None, "off"):
            raise QimgError("Preallocation can only be used for growing images")
        if total < current and not shrink:
            raise QimgError(SHRINK_ERROR)
        drv.truncate(total, shrink=True, prealloc=prealloc or "off")
        drv.flush()
        return total
    finally:
        chain.close()
