"""The project's configuration errors: raised anywhere, printed as one line naming the file and key."""

from __future__ import annotations

__all__ = ["ConfigError", "Invalid", "print_error"]


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and key."""


class Invalid(ValueError):
    """Raised by a config dataclass's ``validate()``: ``Invalid(field, message)``; the loader adds the
    block's prefix and the file that set the key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message


def print_error(exc: BaseException) -> None:
    """``error: <message>`` on stderr as one line, whatever the message holds (how every command ends on a
    ConfigError or DataError, with exit code 2)."""
    import sys

    print(f"error: {' '.join(str(exc).split())}", file=sys.stderr, flush=True)
