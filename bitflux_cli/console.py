"""The only place stages report from: a rich console and progress bars on stderr.

stdout is kept for the ``--json`` object, so nothing here ever writes to it.
"""

import ctypes
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
    # huggingface_hub's note on an argument diffusers still passes when it resolves a hub id
    warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks", category=UserWarning)


M_MMAP_THRESHOLD = -3  # glibc mallopt parameter


def fix_mmap_threshold(size: int = 1 << 20) -> None:
    """Serve every allocation of ``size`` bytes or more from its own mapping (glibc only).

    glibc raises its mmap threshold to the size of each mapped chunk it frees (up to 32 MB); after
    the first streamed block is dropped, the next blocks' 19-38 MB tensors come from the heap, which
    fragments, and peak memory grew with the number of blocks walked (calibrate on a full-width
    stand-in: 1.62 GB at 3 blocks, 1.67 GB at 6; with the threshold fixed, 1.31 and 1.32 GB).
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, size)
    except (OSError, AttributeError):
        pass  # not glibc
