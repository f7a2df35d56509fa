"""``RichReporter``: the core's progress protocol (:mod:`mudsc_graph.merging.progress`) as rich progress bars.

One bar per stage (``tracing``, ``statistics``, ``matching sweeps``, ``training`` ...) on the
console given (stderr in every command, so ``--json`` on stdout stays clean). Stages may nest: an
outer ``merging`` bar stays while each merge's own stages come and go; ``advance`` moves the
innermost one. Nothing is drawn with ``enabled=False`` (``--quiet``) or when the console is not a
terminal::

    reporter = RichReporter(err(), enabled=not quiet)
    with reporter:
        merge(models, data=batches, reporter=reporter)
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn


def _format_info(info: dict[str, Any]) -> str:
    parts = []
    for key, value in info.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.4g}")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


class RichReporter:
    """A :class:`~mudsc_graph.merging.progress.Reporter` drawing rich progress bars on ``console``.

    ``enabled``: draw at all (``False`` for ``--quiet``); bars are also off when the console is
    not a terminal. ``keep_finished``: leave a finished stage's bar on screen (``False``: remove
    it, so that long runs with many stages stay short). Use as a context manager, or let the
    first ``start`` open the display and the last ``end`` close it.
    """

    def __init__(self, console: Console, enabled: bool = True, *, keep_finished: bool = True) -> None:
        self.console = console
        self.enabled = bool(enabled) and console.is_terminal
        self.keep_finished = keep_finished
        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}", style="dim"),
            console=console,
            disable=not self.enabled,
            transient=not keep_finished,
        )
        self._stack: list[TaskID] = []
        self._running = False
        self._entered = False

    # context manager: the display lives from __enter__ to __exit__
    def __enter__(self) -> "RichReporter":
        self._entered = True
        self._open()
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._stack:
            self.end()
        self._entered = False
        self._close()

    def _open(self) -> None:
        if not self._running:
            self._progress.start()
            self._running = True

    def _close(self) -> None:
        if self._running:
            self._progress.stop()
            self._running = False

    # the Reporter protocol
    def start(self, stage: str, total: int | None = None) -> None:
        self._open()
        task = self._progress.add_task(stage, total=total, info="")
        self._stack.append(task)

    def advance(self, n: int = 1, **info: Any) -> None:
        if not self._stack:
            return
        fields = {"info": _format_info(info)} if info else {}
        self._progress.update(self._stack[-1], advance=n, **fields)

    def end(self) -> None:
        if not self._stack:
            return
        task = self._stack.pop()
        done = self._progress.tasks[[t.id for t in self._progress.tasks].index(task)].completed
        if self.keep_finished:  # a stage that stopped early (converged sweeps) ends as a full bar
            self._progress.update(task, total=max(done, 1), completed=max(done, 1))
            self._progress.stop_task(task)
        else:
            self._progress.remove_task(task)
        if not self._stack and not self._entered:
            self._close()

    def log(self, message: str) -> None:
        """Print a line above the bars; silent when the bars are off."""
        if self.enabled:
            self._progress.console.print(message, highlight=False, markup=False, soft_wrap=True)
