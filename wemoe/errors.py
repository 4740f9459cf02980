"""One exception type for every refusal the user can fix.

The CLI turns a ``WemoeError`` into one line on stderr; anything else is a bug
and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path

MAX_MESSAGE = 2000  # characters of one error line


class WemoeError(Exception):
    """A user-facing error: bad input, bad option, refused output path."""

    def __init__(self, message: str, *, path: str | Path | None = None, tensor: str | None = None):
        self.path = str(path) if path is not None else None
        self.tensor = tensor
        where = []
        if self.path:
            where.append(self.path)
        if tensor:
            where.append(f"tensor '{tensor}'")
        text = f"{': '.join(where)}: {message}" if where else message
        if len(text) > MAX_MESSAGE:  # a message echoes what it was given; a hostile value may be huge
            text = text[: MAX_MESSAGE - 15] + " ... (cut off)"
        super().__init__(text)


class UsageError(WemoeError):
    """The options do not fit together (an option for another method, a missing --base): exit code 2."""


class ReportedElsewhere(WemoeError):
    """A torchrun rank other than 0 stops for an error that rank 0 prints: the CLI exits with ``exit_code`` and prints nothing."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
