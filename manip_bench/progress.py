"""Progress reporting for long loops, without importing a terminal library up front.

A loop (the attack engine's steps, say) reports through :func:`reporter`, which accepts

* ``None``: automatic -- a rich bar when standard error is a terminal, silent otherwise
  (so scripts, notebooks' logs, pipes and anything run by pytest stay quiet);
* ``False``: silent; ``True``: always a rich bar;
* a callable ``progress(step, total, stats)``, called after each step with the step
  number (1-based), the number of steps planned and a dict of the step's numbers
  (e.g. ``{"loss": 0.12}``);
* a running ``rich.progress.Progress`` (anything with ``add_task``/``update``/
  ``remove_task``): a task is added to it for the loop and removed after.

rich is imported only when a bar is actually drawn. Whatever the display, the time of the
first step is used to warn (:class:`LongRunWarning`) when the whole loop will take more than
:data:`LONG_RUN_SECONDS`, naming what shortens it.
"""
import contextlib
import math
import os
import sys
import time
import warnings

#: a loop whose first step predicts a longer run than this gets a warning
LONG_RUN_SECONDS = 180.0


class LongRunWarning(UserWarning):
    """The first step of a loop predicts a run of several minutes."""


def interactive(stream=None):
    """Whether ``stream`` (default: standard error) is a terminal a person watches
    (not while pytest runs a test)."""
    if "PYTEST_CURRENT_TEST" in os.environ:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # replaced or closed streams
        return False


def rich_bar(console=None, fields=("loss",)):
    """A new ``rich.progress.Progress`` with a bar, m/n, the given numeric fields and ETA."""
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeRemainingColumn)
    columns = [TextColumn(f"{name} {{task.fields[{name}]:.3g}}") for name in fields]
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    *columns, TimeRemainingColumn(), transient=False, console=console)


def _is_progress_display(progress):
    return all(hasattr(progress, name) for name in ("add_task", "update", "remove_task"))


def _estimate(seconds):
    """``about 12 minutes`` / ``about 40 s``."""
    return f"about {seconds / 60:.0f} minutes" if seconds >= 120 else f"about {seconds:.0f} s"


@contextlib.contextmanager
def reporter(progress, name, total, shorten=None, **fields):
    """Yield ``advance(**stats)``, to be called once per step; see the module docstring.

    ``shorten`` says what makes the loop shorter (``"fewer iterations shorten it"``), for the warning
    after a slow first step; ``fields`` are the stats' starting values for a bar (default
    ``loss=nan``).
    """
    start = time.perf_counter()
    steps = 0
    with _display(progress, name, total, fields) as show:
        def advance(**stats):
            nonlocal steps
            steps += 1
            if steps == 1:
                _warn_if_long(name, time.perf_counter() - start, total, shorten)
            show(**stats)
        yield advance


def _warn_if_long(name, first, total, shorten):
    expected = first * total
    if total and expected > LONG_RUN_SECONDS:
        hint = f"; {shorten}" if shorten else ""
        warnings.warn(f"{name}: the first of {total} steps took {first:.1f} s, so this run "
                      f"will take {_estimate(expected)}{hint}", LongRunWarning,
                      stacklevel=4)


@contextlib.contextmanager
def _display(progress, name, total, fields):
    """Yield ``show(**stats)`` for one step on the display ``progress`` chose."""
    fields = fields or {"loss": math.nan}
    if progress is None:
        progress = interactive()
    if progress is False:
        yield lambda **stats: None
        return
    if _is_progress_display(progress):
        task = progress.add_task(name, total=total, **fields)
        try:
            yield lambda **stats: progress.update(task, advance=1, **stats)
        finally:
            progress.remove_task(task)
        return
    if progress is True:
        bar = rich_bar(fields=tuple(fields))
        task = bar.add_task(name, total=total, **fields)
        with bar:
            yield lambda **stats: bar.update(task, advance=1, **stats)
        return
    if callable(progress):
        step = 0

        def advance(**stats):
            nonlocal step
            step += 1
            progress(step, total, stats)
        yield advance
        return
    raise TypeError(f"progress must be None, a bool, a callable (step, total, stats) or a "
                    f"rich Progress, not {type(progress).__name__}")
