"""The run directory: one folder per trained model.

    RUN_DIR/config.yaml                    the run's settings (``method:`` names the method that reads them)
    RUN_DIR/dataset.json                   dataset statistics at training time
    RUN_DIR/train.log                      one line per epoch and per event
    RUN_DIR/checkpoints/epoch-NNNNN.safetensors   weights (+ EMA) + optimizer state (resumable)
    RUN_DIR/checkpoints/epoch-NNNNN-step-SSSSSSS.safetensors   the same, taken inside epoch NNNNN + 1
                                           (a step mark or the end of a time/step budget)
    RUN_DIR/test/                          written by ``ddad test``
    RUN_DIR/.lock                          held while a training or a tune writes the run (PID, host, what)
"""

from __future__ import annotations

import os
import re
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from .checkpoint import Checkpoint, atomic_write_text
from .config import read_yaml_mapping

_EPOCH_RE = re.compile(r"^epoch-(\d+)(?:-step-(\d+))?\.safetensors$")


@dataclass(frozen=True)
class WeightsConfig:
    """Which weights of a run detection uses (with the detection settings, they make the calibration key)."""

    checkpoint: str | None = None  # a file name in checkpoints/ or a path; None: the latest
    average: str = "ema"  # ema: the moving average of the weights where training kept one | raw
    backbone_weights: str | None = None  # the pretrained backbone's file or folder, or "random"; None: torch cache

    def __post_init__(self) -> None:
        if self.average not in ("ema", "raw"):
            raise ValueError(f"weights.average must be 'ema' or 'raw', got {self.average!r}")

    def state_dict(self, ckpt: Checkpoint) -> dict:
        """The weights these settings choose from ``ckpt``: its EMA where kept and ``average`` is "ema", else raw."""
        return ckpt.state_dict("ema" if self.average == "ema" and ckpt.has("ema") else "model")


class RunInUse(RuntimeError):
    """Another process holds the run directory's lock."""


def _try_lock(fh) -> bool:
    """An exclusive, non-blocking lock on the open file ``fh``, released by the system when its process ends."""
    try:
        import fcntl

        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fh.fileno(), msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
    except OSError:
        return False
    return True


class Settings(Protocol):
    def to_yaml(self) -> str: ...


class RunDir:
    def __init__(self, root: Path | str, part: str | None = None) -> None:
        self.root = Path(root)
        self.part = part  # a second model trained in the same run (see :meth:`part_of`)

    def part_of(self, name: str) -> "RunDir":
        """The same run for another model trained in it (DRDC's refiner): its checkpoints in
        checkpoints/<name>/, its log lines in the run's train.log, tagged with ``name``."""
        return RunDir(self.root, name)

    @property
    def config_path(self) -> Path:
        return self.root / "config.yaml"

    @property
    def checkpoint_dir(self) -> Path:
        return self.root / "checkpoints" if self.part is None else self.root / "checkpoints" / self.part

    @property
    def log_path(self) -> Path:
        return self.root / "train.log"

    @property
    def test_dir(self) -> Path:
        return self.root / "test"

    @property
    def threshold_path(self) -> Path:
        return self.root / "threshold.json"

    @property
    def calibration_dir(self) -> Path:
        return self.root / "calibration"

    @property
    def banks_dir(self) -> Path:
        """Memory banks (PatchCore's, DRDC's memory-bank base), one file each (:mod:`ddad.memory_bank`)."""
        return self.root / "banks"

    def exists(self) -> bool:
        return self.config_path.is_file()

    def require(self) -> "RunDir":
        if not self.root.is_dir():
            raise FileNotFoundError(f"run directory {self.root} does not exist")
        if not self.config_path.is_file():
            raise FileNotFoundError(f"{self.root} is not a ddad run directory: {self.config_path} is missing")
        return self

    def read_config(self) -> dict:
        """The mapping in config.yaml as written (``ddad.methods.load_run_config`` makes it typed)."""
        return read_yaml_mapping(self.require().config_path)

    def save_config(self, config: Settings) -> None:
        atomic_write_text(self.config_path, config.to_yaml())

    def checkpoint_path(self, epoch: int, step: int | None = None) -> Path:
        """``epoch`` completed epochs; ``step`` for a checkpoint taken inside the next epoch."""
        suffix = "" if step is None else f"-step-{step:07d}"
        return self.checkpoint_dir / f"epoch-{epoch:05d}{suffix}.safetensors"

    def checkpoints(self) -> list[tuple[int, Path]]:
        """(completed epochs, path), oldest first; a mid-epoch checkpoint sorts after the end of the epochs it completed."""
        if not self.checkpoint_dir.is_dir():
            return []
        found = []
        for p in self.checkpoint_dir.iterdir():
            m = _EPOCH_RE.match(p.name)
            if m:
                step = int(m.group(2)) if m.group(2) else -1
                found.append((int(m.group(1)), step, p))
        return [(epoch, path) for epoch, _, path in sorted(found)]

    def resolve_checkpoint(self, name: str | Path | None) -> Path:
        """``name`` as a path, or a file name in checkpoints/; None: the latest. Errors name what is missing."""
        if name is None:
            path = self.latest_checkpoint()
            if path is None:
                raise FileNotFoundError(f"run {self.root} has no checkpoint in {self.checkpoint_dir}; train it first")
            return path
        for path in (Path(name), self.checkpoint_dir / str(name)):
            if path.is_file():
                return path
        have = ", ".join(p.name for _, p in self.checkpoints()) or "none"
        raise FileNotFoundError(f"checkpoint {name} not found (as a path or in {self.checkpoint_dir}; there: {have})")

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that can be read. Unreadable newer ones (a truncated file, say) are
        skipped with a warning naming them and the one used instead; they are left on disk."""
        skipped = []
        for _, path in reversed(self.checkpoints()):
            try:
                Checkpoint(path)
            except (ValueError, OSError) as exc:
                skipped.append(f"{path.name} ({exc})")
                continue
            if skipped:
                self.warn(f"skipped unreadable checkpoint(s) {'; '.join(skipped)}; using {path.name}")
            return path
        if skipped:
            self.warn(f"no readable checkpoint in {self.checkpoint_dir}: {'; '.join(skipped)}")
        return None

    @contextmanager
    def locked(self, what: str) -> Iterator[None]:
        """Hold RUN_DIR/.lock while ``what`` (training, tune) writes the run; :class:`RunInUse` naming the PID
        that holds it otherwise. The system releases the lock when its process ends, however it ends: a lock
        file left by a killed process is stale and is taken over, with a note."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        fh = open(path, "a+", encoding="utf-8")
        try:
            if not _try_lock(fh):
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise RunInUse(f"run directory {self.root} is in use by {holder}; wait for it to finish or stop it, "
                               f"or choose another --run-dir")
            fh.seek(0)
            previous = fh.read().strip()
            if previous:
                print(f"note: took over the stale lock of {self.root} ({previous}: no longer running)", file=sys.stderr)
            fh.seek(0)
            fh.truncate()
            fh.write(f"PID {os.getpid()} on {socket.gethostname()} ({what} since {time.strftime('%Y-%m-%d %H:%M:%S')})")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()  # an empty file: released cleanly (the system drops the lock on close)
                fh.flush()
        finally:
            fh.close()

    def warn(self, message: str) -> None:
        """A warning on stderr and in the run's log."""
        print(f"warning: {message}", file=sys.stderr)
        if self.root.is_dir():
            self.log(f"warning: {message}")

    def log(self, message: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "a", encoding="utf-8") as fh:
            tag = "" if self.part is None else f"[{self.part}] "
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {tag}{message}\n")
