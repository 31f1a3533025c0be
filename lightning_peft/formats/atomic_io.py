"""Writes that a kill at any instant cannot leave half done: files, adapter directories, Lightning checkpoints.

* A file is written under a temporary name in its own directory, flushed to disk and renamed over the target
  (a rename within one filesystem is atomic; a temporary file elsewhere, e.g. in TMPDIR, would be *copied*
  across filesystems and could be killed half-copied under the final name).
* An adapter directory of its own is written whole into a sibling and swapped with the old one in one
  ``renameat2(RENAME_EXCHANGE)`` (Linux), so readers see the old adapter or the new one, never a mix of the
  new weights and the old config (a directory that holds other files too gets one atomic rename per file). Where the exchange is unavailable, the old directory is renamed aside and the
  new one renamed in; a kill between those two renames leaves the old adapter, complete, under
  ``.<name>.old-*`` beside it (named by :func:`describe_interrupted`).
* :class:`AtomicCheckpointIO` writes Lightning checkpoints the same way as files.
"""

from __future__ import annotations

import ctypes
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.plugins.io import TorchCheckpointIO

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_file(target: Path, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` for a temporary file beside ``target``, then rename it onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    for leftover in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):  # from writes killed earlier
        leftover.unlink(missing_ok=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system offers no such call."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(code, f"exchanging {a} and {b}: {os.strerror(code)}")


def write_directory(
    directory: Path,
    files: dict[str, Callable[[str], Any]],
    carried: Iterable[str] = (),
    superseded: Iterable[str] = (),
) -> bool:
    """Write ``files`` (name -> ``write(path)``, in order) into ``directory``; returns whether all at once.

    A new directory, or one holding only ``files``' names, ``carried`` ones (copied into the new directory) and
    ``superseded`` ones (dropped), is written whole into a sibling and swapped in. A directory that also holds
    other things (a run directory, say) cannot be swapped without taking them away: there each file is replaced
    atomically on its own, in order.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a directory; pass a directory path.")
    known = set(files) | set(carried) | set(superseded)
    if directory.exists() and any(
        p.name not in known and not any(p.name.startswith(f".{k}.") for k in files)
        for p in directory.iterdir()
    ):
        for name, write in files.items():
            atomic_write_file(directory / name, write)
        return False
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        for name, write in files.items():
            write(str(staging / name))
            _fsync(staging / name)
        if directory.exists():
            for name in set(carried) - set(files):
                if (directory / name).is_file():
                    shutil.copy2(directory / name, staging / name)
        os.chmod(staging, 0o777 & ~_umask())
        _swap_in(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # after an exchange: the old directory
    for leftover in directory.parent.glob(f".{glob.escape(directory.name)}.*"):
        if _is_leftover(leftover.name, directory.name):
            shutil.rmtree(leftover, ignore_errors=True)
    return True


def _swap_in(staging: Path, directory: Path) -> None:
    if not directory.exists():
        os.rename(staging, directory)
        return
    if _exchange(staging, directory):
        return
    aside = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
    os.rmdir(aside)
    os.rename(directory, aside)
    os.rename(staging, directory)
    shutil.rmtree(aside, ignore_errors=True)


def _is_leftover(name: str, directory_name: str) -> bool:
    return name.startswith(f".{directory_name}.") and (name.endswith(".tmp") or ".old-" in name)


def describe_interrupted(directory: Path) -> str:
    """A sentence naming an interrupted write's leftovers beside ``directory`` (empty if there are none)."""
    aside = sorted(directory.parent.glob(f".{directory.name}.old-*"))
    if not aside:
        return ""
    return f" An interrupted save left the previous adapter in {aside[-1]}; rename it to {directory.name}."


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` writing local checkpoints beside their final name and renaming them
    (Lightning's own write goes through a temporary file in TMPDIR, which is copied, not renamed, when the
    checkpoint directory is on another filesystem). Remote paths are left to Lightning.

    ``before_save``, when set, sees every checkpoint dict before it is written (local or remote) and may change it
    in place: ``PEFTCallback`` filters there the checkpoints none of its hooks saw."""

    before_save: Callable[[dict[str, Any]], None] | None = None

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if self.before_save is not None:
            self.before_save(checkpoint)
        if storage_options is not None or ("://" in str(path) and not str(path).startswith("file://")):
            return super().save_checkpoint(checkpoint, path, storage_options)
        target = Path(get_filesystem(path)._strip_protocol(str(path)))
        atomic_write_file(target, lambda tmp: torch.save(checkpoint, tmp))

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            return super().load_checkpoint(path, *args, **kwargs)
        except FileNotFoundError:
            raise
        except Exception as error:  # torch's unpickling/zip errors do not name the file
            raise ValueError(
                f"Checkpoint {path} cannot be read ({type(error).__name__}: {str(error).splitlines()[0]}): it is "
                "truncated or not a checkpoint. Resume from another one (e.g. the previous epoch's)."
            ) from error
