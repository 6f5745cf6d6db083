"""Progress bars for long steps: rich on a terminal, silent when quiet or not a TTY."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

Advance = Callable[[int], None]

_stop_check: ContextVar[Callable[[], None] | None] = ContextVar("stop_check", default=None)


@contextmanager
def stop_points(check: Callable[[], None]) -> Iterator[None]:
    """Run `check()` (which may raise to stop the work) at every stop_point() inside this context: a
    cancelled gRPC job stops inside a long step (validation, statistics) instead of after it."""
    token = _stop_check.set(check)
    try:
        yield
    finally:
        _stop_check.reset(token)


def stop_point() -> None:
    """A place where long work may be stopped (per image or batch); a no-op outside stop_points()."""
    check = _stop_check.get()
    if check is not None:
        check()


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None, quiet: bool = False) -> Iterator[Advance]:
    """Yield `advance(n)`; a no-op when progress is disabled."""
    if not progress_enabled(quiet):
        yield lambda _n: None
        return
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)
