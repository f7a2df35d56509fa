"""The progress-reporting protocol of the core (the CLI implements it with rich progress bars).

The core never imports rich or typer: it calls ``start(stage, total)``, ``advance(n, **info)``
and ``end()`` on whatever reporter it is given, or on :class:`NullReporter`.
"""

from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, stage: str, total: int | None = None) -> None: ...

    def advance(self, n: int = 1, **info: Any) -> None: ...

    def end(self) -> None: ...


class NullReporter:
    """Reports nothing."""

    def start(self, stage: str, total: int | None = None) -> None:
        pass

    def advance(self, n: int = 1, **info: Any) -> None:
        pass

    def end(self) -> None:
        pass
