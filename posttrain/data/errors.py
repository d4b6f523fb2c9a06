"""The one error type the data layer raises: it names the file, line and field, and what was expected."""

from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """Bad input data. ``str(error)`` is one line a user can act on: ``file:line: field: problem``."""

    def __init__(self, path: str | Path | None, line: int | None, field: str | None, problem: str) -> None:
        self.path, self.line, self.field, self.problem = path, line, field, problem
        where = f"{path}:{line}: " if line is not None else f"{path}: " if path is not None else ""
        what = f"field {field!r}: " if field else ""
        super().__init__(f"{where}{what}{problem}")
