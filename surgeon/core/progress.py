"""Progress of long steps, for two audiences: rich bars on a terminal (silent when quiet or not a TTY), and
an Observer that a caller installs around library calls (the gRPC service: operation metadata and
cancellation). The library reports once, through `stage`, `progress_bar` and `stop_point`; it never
knows which shell listens."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Protocol

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

Advance = Callable[[int], None]
ESTIMATE_WINDOW_S = 3600.0  # a bar's ETA comes from the speed over this many seconds (steps may take minutes)


class Observer(Protocol):
    """Receives every step of the library calls made inside `observed(...)`; either method may raise to stop
    the work there (a cancelled job)."""

    def step(self, stage: str, done: int, total: int | None) -> None: ...

    def check(self) -> None: ...


_observer: ContextVar[Observer | None] = ContextVar("observer", default=None)


@contextmanager
def observed(observer: Observer) -> Iterator[None]:
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


def stage(name: str) -> None:
    """The start of a step without a count (loading the model, writing the outputs)."""
    observer = _observer.get()
    if observer is not None:
        observer.step(name, 0, None)


def stop_point() -> None:
    """A place where long work may be stopped (per image or batch)."""
    observer = _observer.get()
    if observer is not None:
        observer.check()


def say(message: str, quiet: bool = False) -> None:
    """One line on stderr before a long step pays its cost: what it will do and how much (unless quiet)."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


_kept: ContextVar[str | None] = ContextVar("kept_on_interrupt", default=None)


@contextmanager
def kept_on_interrupt(describe: Callable[[], str]) -> Iterator[None]:
    """Work that keeps what it finished when interrupted (a study's cells) says so: the shells print
    `describe()` instead of "nothing was written"."""
    try:
        yield
    except KeyboardInterrupt:  # Ctrl-C and SIGTERM (the CLI's handler raises it for both)
        _kept.set(describe())
        raise


def kept_after_interrupt() -> str:
    """What an interrupted call left behind on purpose (its `kept_on_interrupt` note), else nothing."""
    return _kept.get() or "nothing was written"


def progress_enabled(quiet: bool) -> bool:
    return not quiet and sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None, quiet: bool = False) -> Iterator[Advance]:
    """Yield `advance(n)`: moves the terminal bar (unless quiet or not a TTY) and tells the observer."""
    observer = _observer.get()
    done = 0

    def tell(n: int) -> None:
        nonlocal done
        done += n
        if observer is not None and description:  # unnamed steps (inner evaluations of a search) stay inside theirs
            observer.step(description, done, total)

    tell(0)
    if not progress_enabled(quiet):
        yield tell
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    # rich estimates the speed from the steps of the last `speed_estimate_period` seconds (default 30): a step
    # slower than that (a text batch of ViT-L-14 on a CPU) left the estimate blank for the whole bar
    with Progress(*columns, transient=True, speed_estimate_period=ESTIMATE_WINDOW_S) as bar:
        task = bar.add_task(description, total=total)

        def advance(n: int) -> None:
            bar.advance(task, n)
            tell(n)

        yield advance
