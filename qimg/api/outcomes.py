"""What the library's commands that make, size or compare images return (``convert``, ``create``,
``measure``, ``compare``): typed, frozen dataclasses.  The queries' results are in ``results.py``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CompareResult:
    """The outcome of ``qimg compare``: ``identical`` and the status (0 identical, 1 different)."""

    identical: bool
    exit_code: int
    #: the lines ``qimg compare`` prints ("Images are identical.", "Content mismatch at offset N!", ...)
    messages: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return self.identical


@dataclass(frozen=True)
class MeasureResult:
    """``qimg measure``: bytes a new image needs now and fully allocated (and for its bitmaps)."""

    required: int
    fully_allocated: int
    bitmaps: int | None = None

    def to_dict(self) -> dict:
        """Exactly what ``qimg measure --output=json`` prints, as a dict."""
        out = {"required": self.required, "fully-allocated": self.fully_allocated}
        if self.bitmaps is not None:
            out["bitmaps"] = self.bitmaps
        return out

    def to_json(self) -> str:
        """The text ``qimg measure --output=json`` prints."""
        from ..qjson import output_text

        return output_text(self.to_dict())


@dataclass(frozen=True)
class CreateResult:
    """A created image: its name, format and size, and the "Formatting ..." line qemu-img prints."""

    filename: str
    format: str
    size: int | None
    formatting: str


@dataclass(frozen=True)
class ConvertResult:
    """A finished convert: the target, its format and the guest bytes copied (its virtual size)."""

    target: str
    format: str
    virtual_size: int
