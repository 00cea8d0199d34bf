"""The served model file must not change in place while its mapping is in use.

The engine reads weights straight from a mapping of the file (model-format §1). A file
overwritten in place (`cp new.gguf model.gguf`) changes under the running model: reads past a
new end raise SIGBUS, which the engine's map guard (native/mapguard.c) turns into one clear
line and exit status 75; a rewrite that keeps the size would silently serve a mix of two
models. `ModelFileWatch` notices the second case too, from the file's size and modification
time, and the inference thread then ends the process the same way, before another step reads
the changed data. A file replaced by rename is a different inode: the running model keeps the
old one, safely, until a reload.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import NoReturn

from bitnetd_trio._native import lib

__all__ = [
    "EXIT_MODEL_FILE_CHANGED",
    "ModelFileWatch",
    "exit_model_file_changed",
    "set_fatal_log",
]

log = logging.getLogger("bitnetd.engine")

#: The status the process ends with, the same as the map guard's (EX_TEMPFAIL).
EXIT_MODEL_FILE_CHANGED = int(lib.BN_MAPGUARD_EXIT)


class ModelFileWatch:
    """Tells whether the file at `path` was changed in place since it was opened."""

    def __init__(self, path: str, interval: float = 1.0) -> None:
        self.path = path
        self.interval = interval  # seconds between two looks at the file
        st = os.stat(path)
        self._identity = (st.st_dev, st.st_ino)
        self._state = (st.st_size, st.st_mtime_ns)
        self._next_look = time.monotonic() + interval

    def changed_in_place(self) -> str | None:
        """What changed, when the same file (not a renamed-over one) has a new size or
        modification time; None otherwise. Looks at most once per `interval`."""
        now = time.monotonic()
        if now < self._next_look:
            return None
        self._next_look = now + self.interval
        try:
            st = os.stat(self.path)
        except OSError:
            return None  # removed or renamed away: the mapping keeps the old data
        if (st.st_dev, st.st_ino) != self._identity:
            return None  # replaced by rename: the mapping keeps the old file
        size, mtime = self._state
        if (st.st_size, st.st_mtime_ns) == (size, mtime):
            return None
        return f"{size} -> {st.st_size} bytes" if st.st_size != size else "rewritten"


def exit_model_file_changed(path: str, what: str) -> NoReturn:
    """End the process at once with one line naming the file (as the map guard does)."""
    log.critical(
        "the model file %s changed under the running daemon (%s); exiting so that it is "
        "restarted. Replace model files by renaming a new file over the old one, then reload.",
        path,
        what,
    )
    logging.shutdown()
    sys.stderr.flush()
    os._exit(EXIT_MODEL_FILE_CHANGED)


def set_fatal_log(fd: int, prefix: str) -> None:
    """Where the map guard's line goes besides stderr: a log file or a connected syslog socket
    (`fd`, -1 for none), each line starting with `prefix`."""
    lib.bn_set_fatal_log(fd, prefix.encode("utf-8", "replace")[:63])
