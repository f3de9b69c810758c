"""The folder of shared weights a gateway owns, and its removal however the gateway ends.

Workers publish one copy of a model's weights per host (``worker.model.sharing``)
into a folder the gateway names, one per model and reload generation::

    <--weights-cache>/torchpool-weights-<gateway pid>-<token>/
        .owner                held with flock by the gateway for its whole life
        <model>.<generation>/ one model's published files (and the workers' locks)

The gateway removes a model's folder when the model is unloaded, the previous
generation's when a reload has taken over, and its whole folder when it stops.
A gateway killed with SIGKILL cannot; its ``.owner`` lock dies with it, so the
next gateway to start over the same cache removes every folder whose lock it
can take. Removing a file that workers map is safe: their mappings live on
until they exit, and the memory returns when the last one does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Final

log = logging.getLogger("torchpool.weights")

PREFIX: Final = "torchpool-weights-"
OWNER: Final = ".owner"
# A folder without its owner lock yet may belong to a gateway starting this instant.
_YOUNG_S: Final = 60.0


class WeightsCache:
    """This gateway's folder under ``root``, locked for as long as the gateway lives."""

    def __init__(self, root: str) -> None:
        base = Path(root)
        if not base.is_dir():
            base = Path(tempfile.gettempdir())  # no /dev/shm (macOS): the temp folder
        self.removed = remove_leftovers(base)
        self.folder = base / f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        self.folder.mkdir(mode=0o700)
        # os.open's descriptors are not inherited: workers never hold the lock.
        self._owner = os.open(self.folder / OWNER, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._generations: dict[str, int] = {}

    def model_dir(self, name: str) -> Path:
        """A fresh folder name for ``name``'s next generation of workers (made by them)."""
        generation = self._generations.get(name, -1) + 1
        self._generations[name] = generation
        return self.folder / f"{name}.{generation}"

    def remove(self, folder: Path) -> None:
        """Remove one generation's folder (a reload took over, or failed)."""
        shutil.rmtree(folder, ignore_errors=True)

    def remove_model(self, name: str) -> None:
        """Remove every folder of ``name`` (it was unloaded)."""
        for folder in self.folder.glob(f"{name}.*"):
            if folder.name.rpartition(".")[0] == name:
                shutil.rmtree(folder, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            os.close(self._owner)


def remove_leftovers(root: Path) -> list[Path]:
    """Remove the folders of gateways that are gone (their owner lock is free); the removed."""
    removed: list[Path] = []
    for folder in root.glob(f"{PREFIX}*"):
        if _abandoned(folder):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    if removed:
        log.info("removed shared weights left by %d gateway(s) that are gone", len(removed))
    return removed


def _abandoned(folder: Path) -> bool:
    try:
        fd = os.open(folder / OWNER, os.O_RDONLY)
    except FileNotFoundError:
        with contextlib.suppress(OSError):
            return time.time() - folder.stat().st_mtime > _YOUNG_S
        return False
    except OSError:
        return False  # another user's folder: not ours to judge
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False  # its gateway holds it: alive
    finally:
        os.close(fd)
    return True
