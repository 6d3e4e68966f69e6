"""The only place stages report from: a rich console and progress bars on stderr.

stdout is kept for the ``--json`` object, so nothing here ever writes to it.
"""

from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(stderr=True)


def info(message: str) -> None:
    """One line of progress information on stderr."""
    console.print(message, highlight=False)


@contextmanager
def progress(description: str, total: int, unit: str = "it"):
    """A progress bar on stderr with rate and ETA; yields ``advance(n=1)``."""
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(description, total=total, rate="")

        def advance(n: int = 1) -> None:
            bar.advance(task, n)
            t = bar.tasks[task]
            if t.elapsed:
                bar.update(task, rate=f"{t.completed / t.elapsed:.2f} {unit}/s")

        yield advance



def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (casting notes, optional-backend warnings) off the terminal."""
    import os
    import warnings

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
