"""Progress bars and logs on stderr; quiet when stderr is not a terminal or with --quiet."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)
_state = {"quiet": False}


def set_quiet(quiet: bool) -> None:
    _state["quiet"] = quiet


def log_enabled() -> bool:
    """Logs and tables go to stderr unless --quiet was given (also when stderr is not a terminal)."""
    return not _state["quiet"]


def bars_hidden() -> bool:
    """Progress bars show only on a terminal, and never with --quiet."""
    return _state["quiet"] or not console.is_terminal


def log(msg: str) -> None:
    """A status line on stderr (kept even when quiet is implied by a non-terminal; --quiet silences it)."""
    if not _state["quiet"]:
        console.print(msg, highlight=False, markup=False)


@contextlib.contextmanager
def progress(desc: str, total: int | None) -> Iterator[Callable[..., None]]:
    """Yield advance(n=1, **fields); a rich bar on a terminal, nothing otherwise."""
    if bars_hidden():
        yield lambda n=1, **_: None
        return
    cols = [
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    ]
    with Progress(*cols, console=console, transient=True) as p:
        task = p.add_task(desc, total=total, info="")

        def advance(n: int = 1, **fields: object) -> None:
            info = "  ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in fields.items())
            p.update(task, advance=n, info=info)

        yield advance
