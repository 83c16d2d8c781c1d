"""File writing that never leaves a half-written result behind."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Union


def atomic_write_text(path: Union[str, Path], text: str) -> None:
    """Write via a temp file in the same directory + ``os.replace`` so readers never see partial files."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: Union[str, Path], data: bytes) -> None:
    """Binary twin of :func:`atomic_write_text` (checkpoints, packed models)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's private 0600 is not what a user expects of a result file
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_save_png(fig: Any, path: Union[str, Path], dpi: int = 120) -> Path:
    """Render a matplotlib figure to PNG, write it atomically and close the figure (a plot is a
    result file like any other: never half-written)."""
    import io

    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


@contextlib.contextmanager
def exclusive(lock_file: Union[str, Path]) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_file`` for the block: processes started side by side on
    one output dir (e.g. a benchmark's ``--train_only``, one per core) would otherwise all make the
    same shared files at once and replace each other's temp files; the second one waits and then
    finds them made."""
    lock_file = Path(lock_file)
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
