"""The ends journal: how a backend tells the control plane "a task just ended" at once.

The control plane learns a task's end by asking the backend (``status``), and asked only every
``busy_interval`` that would leave a freed GPU idle for that long. So whoever records a task's
end (the local wrapper, the Slurm job's supervisor) also appends one byte to a journal file in
the backend's state directory; the control plane watches the journal's size, which is a
``stat`` call, every few milliseconds, and runs a pass as soon as it grows. The journal is only
a hint: ends are still read from the exit records, and a lost byte costs one ``busy_interval``.
"""

from __future__ import annotations

import os
from pathlib import Path

ENDS_FILE = "ends"


def note_end(journal: str | os.PathLike[str] | None) -> None:
    """Append one byte (O_APPEND: concurrent writers never overwrite each other)."""
    if not journal:
        return
    try:
        fd = os.open(journal, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError:
        return  # a hint only: the end itself is recorded elsewhere
    try:
        os.write(fd, b".")
    except OSError:
        pass
    finally:
        os.close(fd)


def journal_mark(journal: Path) -> int:
    """Changes whenever an end is noted: the journal's size (0 before the first one)."""
    try:
        return os.stat(journal).st_size
    except OSError:
        return 0
