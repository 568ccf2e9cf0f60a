"""Checkpoints that survive a kill: written atomically, verified on load, the last K kept.

Layout (``root`` is ``<out>/checkpoints`` for ``adamoe-finetune``)::

    root/step-00000040/            a complete checkpoint (it got this name by a rename)
        .metadata, __0_0.distcp..  model + optimizer by torch.distributed.checkpoint: every rank
                                   writes its own shard, replicated tensors are written once
        trainer.pt                 the loop's state (rank 0): phase, step, LR scheduler, alpha
                                   schedule, load controller, the log so far, the run's config
        rng-rank0.pt, ...          each rank's RNG states (torch, CUDA, python, numpy)
        manifest.json              written last: size and sha256 of every file above
    root/.tmp-step-00000050/       a write in progress, or one a kill interrupted: never read,
                                   removed by the next save
    root/step-00000030.corrupt/    a checkpoint that failed verification, renamed aside

Save (a collective under ``torchrun``): rank 0 removes stale ``.tmp-*`` folders, every rank writes
into ``.tmp-step-N`` (each file fsynced), the ranks hash their share of the files, rank 0 writes
the manifest, renames the folder to ``step-N`` (atomic on POSIX), fsyncs the root, and deletes all
but the newest ``keep_last`` (renamed to ``.tmp-`` first, so a kill while deleting leaves nothing
that looks complete). Nothing saved is ever written again: a taken name gets a suffix
(``step-N.1``). Under several machines ``root`` must be on a file system all of them see, as
``torch.distributed.checkpoint`` requires.

Load: the newest checkpoint first. One whose manifest is missing or unreadable, or a file of
which is missing, of the wrong size or with the wrong checksum, is reported by a
``CheckpointWarning`` naming the file, renamed to ``*.corrupt`` and skipped for the previous one.

One run at a time: ``CheckpointLock(root)`` is an exclusive ``flock`` on ``root/.lock`` (holding
the holder's pid and host), taken by ``adamoe-finetune`` (rank 0) for the whole run, resumed runs
included; a second run on the same folder fails at once with ``CheckpointLockError`` naming the
folder and the holder. The kernel drops the lock when the holder dies, however it dies.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import random
import re
import shutil
import socket
import time
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

__all__ = ["CheckpointError", "CheckpointLock", "CheckpointLockError", "CheckpointWarning",
           "Checkpointer", "rng_state", "set_rng_state"]

FORMAT = 1
MANIFEST = "manifest.json"
TRAINER = "trainer.pt"
LOCK = ".lock"
_NAME = re.compile(r"^step-(\d{8})(?:\.(\d+))?$")
# Test hook: "during:N" or "after:N" makes every rank stop (sleep until killed) in the middle of
# writing the checkpoint of step N (payload written, no manifest yet) or right after it. Rank 0
# first creates ``root/.stalled-during-N`` (or ``-after-N``) so a test knows when to kill.
STALL_ENV = "ADAMOE_CHECKPOINT_STALL"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped (corrupted or truncated) for the previous one."""


class CheckpointLockError(CheckpointError):
    """Another run holds the checkpoint folder; the message names the folder and the holder."""


# ---- one run per folder -------------------------------------------------------------------------

class CheckpointLock:
    """An exclusive lock on the checkpoint folder ``root`` for one run (``root/.lock``).

    ``acquire()`` creates ``root`` if needed and takes an exclusive, non-blocking ``flock`` on
    ``root/.lock``, then writes the holder (pid, host, start time) into it; if another process
    holds it, it raises ``CheckpointLockError`` naming the folder and that holder. ``release()``
    removes the file and drops the lock; a holder that dies (even by SIGKILL) drops it too, and
    the file it leaves is reused. Also a context manager.
    """

    def __init__(self, root):
        self.root = Path(root)
        self.path = self.root / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> str:
        """Who holds the lock, as written by the holder ("pid 123 on host, since ...")."""
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not isinstance(info, dict) or "pid" not in info:
            return "a process that has not written its pid yet"
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
        return f"pid {info['pid']} on {info.get('host', '?')}, since {since}"

    def acquire(self) -> "CheckpointLock":
        if self._fd is not None:
            return self
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise CheckpointLockError(
                    f"checkpoint folder {self.root} is in use by another run ({self.holder()}; "
                    f"lock file {self.path}): one run at a time may use a checkpoint folder. "
                    "Wait for that run to end (or stop it), or pass another --checkpoint-dir/--out"
                ) from None
            # A releasing holder unlinks the file before it unlocks: if we locked a file that is
            # no longer at the path, lock the one there now.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        os.close(self._fd)  # drops the flock
        self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ---- RNG states ---------------------------------------------------------------------------------

def rng_state(device: torch.device | None = None) -> dict:
    """This process's RNG states: torch (CPU, and ``device`` if it is CUDA), python, numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    try:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = np.random.get_state()
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
    except ImportError:  # pragma: no cover
        pass
    return state


def set_rng_state(state: dict, device: torch.device | None = None) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, gauss = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))


# ---- files --------------------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, write) -> None:
    """``write(f)`` into ``path``, then flush and fsync it."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _describe(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


def _stall(where: str, step: int, root: Path, rank: int) -> None:
    if os.environ.get(STALL_ENV) != f"{where}:{step}":
        return
    if rank == 0:
        (root / f".stalled-{where}-{step}").touch()
    # Until the test kills the process; should it not, leave once the parent (torchrun's agent,
    # or the test) is gone or after 10 minutes, so no stalled process outlives the test.
    parent, deadline = os.getppid(), time.monotonic() + 600
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(0.2)
    os._exit(1)


class Checkpointer:
    """Save and find checkpoints under ``root`` (see the module docstring).

    Args:
        root: the folder of the checkpoints (created by the first save).
        keep_last: how many complete checkpoints to keep (>= 1); older ones are deleted.
        parallel: the run's ``adamoe_kernels.training.parallel.Parallel`` (``None``: one process).
    """

    def __init__(self, root, *, keep_last: int = 2, parallel=None):
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 1:
            raise ValueError(f"keep_last must be an int >= 1, got {keep_last!r}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.parallel = parallel

    # ---- collectives over the run's ranks ---------------------------------------------------

    @property
    def _rank(self) -> int:
        return self.parallel.rank if self.parallel is not None else 0

    @property
    def _world(self) -> int:
        return self.parallel.world_size if self.parallel is not None else 1

    @property
    def _distributed(self) -> bool:
        return self.parallel is not None and self.parallel.distributed

    def _barrier(self) -> None:
        if self._distributed:
            dist.barrier()

    def _gather(self, obj) -> list:
        return self.parallel.all_gather_object(obj) if self._distributed else [obj]

    def _from_main(self, obj):
        if not self._distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    # ---- listing ------------------------------------------------------------------------------

    def checkpoints(self) -> list[Path]:
        """The complete-looking checkpoints (by name), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            match = _NAME.match(p.name)
            if match and p.is_dir():
                found.append(((int(match.group(1)), int(match.group(2) or 0)), p))
        return [p for _, p in sorted(found)]

    def _fresh_name(self, step: int) -> Path:
        base = self.root / f"step-{step:08d}"
        path, i = base, 0
        while path.exists() or Path(f"{path}.corrupt").exists():
            i += 1
            path = Path(f"{base}.{i}")
        return path

    # ---- save ---------------------------------------------------------------------------------

    def save(self, step: int, app_state: dict, trainer_state: dict, rank_state: dict) -> Path:
        """Write the checkpoint of ``step`` (a collective; returns its folder).

        ``app_state``: tensors for ``torch.distributed.checkpoint`` (model and optimizer, each
        rank's shard); ``trainer_state``: the loop's state, the same on every rank (rank 0 writes
        it); ``rank_state``: this rank's own state (its RNG), one file per rank.
        """
        import torch.distributed.checkpoint as dcp

        rank, world = self._rank, self._world
        tmp = self.root / f".tmp-step-{step:08d}"
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            for stale in self.root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
        self._barrier()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a "
                                                      "single process")
            dcp.save(app_state, checkpoint_id=str(tmp), no_dist=not self._distributed)
        _write_file(tmp / f"rng-rank{rank}.pt", lambda f: torch.save(rank_state, f))
        if rank == 0:
            payload = {"format": FORMAT, "step": step, "world_size": world, **trainer_state}
            _write_file(tmp / TRAINER, lambda f: torch.save(payload, f))
        self._barrier()
        names = self._from_main(sorted(p.name for p in tmp.iterdir()) if rank == 0 else None)
        mine = {name: _describe(tmp / name) for name in names[rank::world]}
        files = {}
        for part in self._gather(mine):
            files.update(part)
        _stall("during", step, self.root, rank)
        final = None
        if rank == 0:
            manifest = {"format": FORMAT, "step": step, "world_size": world,
                        "files": dict(sorted(files.items()))}
            _write_file(tmp / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=1).encode()))
            _fsync_dir(tmp)
            final = self._fresh_name(step)
            os.rename(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        final = Path(self._from_main(str(final) if final is not None else None))
        self._barrier()
        _stall("after", step, self.root, rank)
        return final

    def _prune(self) -> None:
        for old in self.checkpoints()[:-self.keep_last]:
            doomed = self.root / f".tmp-delete-{old.name}"
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)

    # ---- load ---------------------------------------------------------------------------------

    def verify(self, path, names: list[str] | None = None) -> None:
        """Raise ``CheckpointError`` (naming the file) unless ``path`` is complete and intact.
        ``names``: check only these files of the manifest (the ranks split the work)."""
        path = Path(path)
        manifest_path = path / MANIFEST
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
                raise ValueError("unknown format")
        except FileNotFoundError:
            raise CheckpointError(f"{manifest_path} is missing (the write did not finish)") from None
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{manifest_path} is unreadable ({err})") from None
        for name in sorted(files) if names is None else names:
            want, file = files[name], path / name
            if not file.is_file():
                raise CheckpointError(f"{file} is missing")
            size = file.stat().st_size
            if size != want["bytes"]:
                raise CheckpointError(f"{file} has {size} bytes, the manifest says "
                                      f"{want['bytes']} (truncated?)")
            if _sha256(file) != want["sha256"]:
                raise CheckpointError(f"{file} does not match its sha256 in {manifest_path} "
                                      "(corrupted)")

    def verify_all(self, path: Path) -> str | None:
        """``verify`` as a collective, the files split over the ranks: the first error message,
        or ``None``, on every rank."""
        rank, world = self._rank, self._world
        names = None
        if world > 1:
            try:
                names = sorted(json.loads((path / MANIFEST).read_text())["files"])[rank::world]
            except Exception:  # noqa: BLE001 - reported by verify below
                names = None
        try:
            self.verify(path, names)
            error = None
        except CheckpointError as err:
            error = str(err)
        errors = [e for e in self._gather(error) if e]
        return errors[0] if errors else None

    def latest(self) -> Path | None:
        """The newest intact checkpoint (a collective), or ``None``. Broken newer ones are
        reported with a ``CheckpointWarning`` naming the file and renamed to ``*.corrupt``."""
        candidates = self._from_main([str(p) for p in self.checkpoints()] if self._rank == 0
                                     else None)
        for path in map(Path, reversed(candidates)):
            error = self.verify_all(path)
            if error is None:
                return path
            if self._rank == 0:
                warnings.warn(f"checkpoint {path} is unusable: {error}; falling back to the "
                              "previous checkpoint", CheckpointWarning, stacklevel=2)
                aside, i = Path(f"{path}.corrupt"), 0
                while aside.exists():
                    i += 1
                    aside = Path(f"{path}.corrupt.{i}")
                os.rename(path, aside)
            self._barrier()
        return None

    def read_trainer_state(self, path) -> dict:
        """The loop state saved with ``path`` (``trainer_state`` of ``save`` plus ``step``,
        ``world_size``)."""
        return torch.load(Path(path) / TRAINER, weights_only=True)

    def read_rank_state(self, path) -> dict | None:
        """This rank's ``rank_state``; ``None`` if the checkpoint has no file for this rank
        (it was saved with fewer ranks)."""
        file = Path(path) / f"rng-rank{self._rank}.pt"
        return torch.load(file, weights_only=True) if file.is_file() else None

    def load_app_state(self, path, app_state: dict) -> None:
        """``torch.distributed.checkpoint.load`` into ``app_state`` in place (each rank reads
        its shard; it may have been saved with another number of ranks)."""
        import torch.distributed.checkpoint as dcp

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a "
                                                      "single process")
            dcp.load(app_state, checkpoint_id=str(path), no_dist=not self._distributed)
