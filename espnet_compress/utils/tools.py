"""Locating the external command-line tools the pipeline shells out to.

Several stages depend on Debian-packaged programs (espeak-ng and sox for the
corpus, sclite for scoring).  A missing program otherwise surfaces as an
opaque ``FileNotFoundError`` deep inside a worker process, so every stage
resolves its tools up front with :func:`require_tool` and fails early with a
message that says exactly which package to install.
"""
from __future__ import annotations

import os
import shutil
from typing import Iterable


class MissingToolError(RuntimeError):
    """A required external program is not installed (or not on PATH)."""


def require_tool(name: str, debian_package: str, extra_dirs: Iterable[str] = ()) -> str:
    """Return the absolute path of executable ``name`` or raise :class:`MissingToolError`.

    ``PATH`` is searched first, then ``extra_dirs``: some packages install
    their binaries outside PATH (e.g. sctk puts ``sclite`` in
    ``/usr/lib/sctk/bin``), and callers should not have to edit PATH for it.
    """
    extra_dirs = [str(d) for d in extra_dirs]
    found = shutil.which(name)
    if found is None and extra_dirs:
        found = shutil.which(name, path=os.pathsep.join(extra_dirs))
    if found is None:
        searched = " and in " + ", ".join(extra_dirs) if extra_dirs else ""
        raise MissingToolError(
            f"{name} not found on PATH{searched}: install it with "
            f"`apt-get install {debian_package}` (or run tools/install.sh)"
        )
    return os.path.abspath(found)
