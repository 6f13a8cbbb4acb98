"""The project's configuration errors: raised anywhere, printed as one line naming the file and key."""

from __future__ import annotations

__all__ = ["ConfigError", "Invalid"]


class ConfigError(ValueError):
    """A configuration problem, with a message that names the file and key."""


class Invalid(ValueError):
    """Raised by a config dataclass's ``validate()``: ``Invalid(field, message)``; the loader adds the
    block's prefix and the file that set the key."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key, self.message = key, message
