"""Progress bars for long work (rich), silent when asked or when nothing is to be shown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def progress_bar(description: str, total: int, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """Yields `advance(**fields)`; fields (e.g. loss=0.3) are shown after the bar."""
    if not enabled:
        yield lambda **_: None
        return
    console = Console(stderr=True)
    if not console.is_terminal:  # a log file or CI: a line every tenth of the way instead of a live bar
        done = 0

        def log_line(**fields) -> None:
            nonlocal done
            done += 1
            if done % max(1, total // 10) == 0 or done == total:
                console.print(f"{description}: {done}/{total} {_status(fields)}", highlight=False)

        yield log_line
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[status]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(**fields) -> None:
            progress.update(task, advance=1, status=_status(fields))

        yield advance


def _status(fields: dict) -> str:
    return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
