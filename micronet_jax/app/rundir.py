"""Writing a run or artifact directory so that no run is ever lost or half-written.

A pipeline never writes into ``OUT`` itself. It writes into ``OUT.incomplete`` (created
before any work, which also proves that ``OUT``'s folder is writable), holding an
exclusive lock on ``OUT.incomplete/lock`` so that a second writer is refused. When
everything is written (checkpoint, config, metrics) a ``manifest.json`` with the SHA-256
of every file is added and the directory is renamed into place; an ``OUT`` that existed
(``overwrite``) is first renamed aside and removed only after the new one is in place.
So a kill, a full disk or an error at any moment leaves the previous ``OUT`` intact,
and a training run's ``OUT.incomplete`` keeps the progress checkpoints that
``train --resume OUT`` continues from.

``verify(dir)`` checks a directory against its manifest: a changed, truncated or
missing file is reported as corrupted, before anything reads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from typing import Any

from micronet_jax.app.errors import ConfigError

INCOMPLETE_SUFFIX = ".incomplete"
LOCK_FILE, MANIFEST_FILE = "lock", "manifest.json"
_NOT_HASHED = {LOCK_FILE, MANIFEST_FILE}


def incomplete_dir(out: str) -> str:
  return os.path.normpath(out) + INCOMPLETE_SUFFIX


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_hashes(directory: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
  """``{relative path: sha256}`` of every file under ``directory`` (sorted, ``/``-separated),
  leaving out the lock, the manifest and the subfolders named in ``skip``."""
  out = {}
  for root, dirs, files in os.walk(directory):
    rel_root = os.path.relpath(root, directory)
    dirs[:] = sorted(d for d in dirs if os.path.normpath(os.path.join(rel_root, d)) not in skip)
    for name in sorted(files):
      rel = os.path.normpath(os.path.join(rel_root, name)).replace(os.sep, "/")
      if rel not in _NOT_HASHED:
        out[rel] = _sha256(os.path.join(root, name))
  return out


def verify(directory: str) -> bool:
  """Checks every file of ``directory`` against its ``manifest.json``.

  Returns False when there is no manifest (a directory written before manifests
  existed: it cannot be checked); raises ``ConfigError`` naming the files that are
  missing, changed or unreadable, and a manifest that is not valid JSON."""
  path = os.path.join(directory, MANIFEST_FILE)
  if not os.path.exists(path):
    return False
  try:
    with open(path) as f:
      expected = json.load(f)["files"]
    if not isinstance(expected, dict):
      raise TypeError("'files' is not an object")
  except (ValueError, KeyError, TypeError) as e:
    raise ConfigError(f"{directory} is corrupted: its {MANIFEST_FILE} is not a valid manifest ({e})") from None
  bad = []
  for rel, digest in sorted(expected.items()):
    file = os.path.join(directory, rel)
    if not os.path.isfile(file):
      bad.append(f"{rel} is missing")
    elif _sha256(file) != digest:
      bad.append(f"{rel} does not match its recorded SHA-256 (changed or truncated)")
  if bad:
    raise ConfigError(f"{directory} is corrupted and was not used:\n  " + "\n  ".join(bad))
  return True


def _locked_by_other(lock_path: str) -> str | None:
  """The pid written in a lock file another process holds, or None if nobody holds it."""
  try:
    fd = os.open(lock_path, os.O_RDWR)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    with open(lock_path) as f:
      return f.read().strip() or "?"
  finally:
    os.close(fd)  # also drops the lock we may just have taken
  return None


class RunWriter:
  """Context manager: ``with RunWriter(out, overwrite=..., resume=...) as w:`` write into
  ``w.path``, then ``w.commit()``. See the module docstring.

  ``resume``: continue in an existing ``OUT.incomplete`` (a killed training run);
  ``keep_on_error``: leave ``OUT.incomplete`` behind when the body raises (training keeps
  its progress checkpoints there; other pipelines remove it).
  """

  def __init__(self, out: str, *, overwrite: bool = False, resume: bool = False, keep_on_error: bool = False):
    self.out = os.path.normpath(out)
    self.path = incomplete_dir(out)
    self.overwrite, self.resume, self.keep_on_error = overwrite, resume, keep_on_error
    self._lock_fd: int | None = None
    self.committed = False

  def _refuse_existing(self) -> None:
    pid = _locked_by_other(os.path.join(self.path, LOCK_FILE))
    if pid is not None:
      raise ConfigError(f"another process (pid {pid}) is writing {self.out}; wait for it or choose another --out")
    if self.resume:
      if not os.path.isdir(self.path):
        done = " (it finished: nothing to resume)" if os.path.isdir(self.out) else ""
        raise ConfigError(f"no interrupted run to resume at {self.out}: {self.path} does not exist{done}")
      return
    if os.path.lexists(self.path) and not self.overwrite:
      raise ConfigError(f"{self.out} holds an interrupted run ({self.path}): continue it with "
                        f"`micronet-jax train --resume {self.out}`, or pass --overwrite to start again")
    if os.path.lexists(self.out) and not self.overwrite:
      raise ConfigError(f"{self.out} already exists; pass --overwrite to replace it (it is kept until the new "
                        f"run is complete), or choose another --out")

  def __enter__(self) -> "RunWriter":
    self._refuse_existing()
    if not self.resume and os.path.lexists(self.path):
      shutil.rmtree(self.path)  # an interrupted run the user chose to overwrite
    try:
      os.makedirs(self.path, exist_ok=self.resume)
      self._lock_fd = os.open(os.path.join(self.path, LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
      fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      os.ftruncate(self._lock_fd, 0)
      os.write(self._lock_fd, str(os.getpid()).encode())
    except BlockingIOError:
      self._release()
      raise ConfigError(f"another process is writing {self.out}") from None
    except OSError as e:
      self._release()
      raise ConfigError(f"cannot write {self.out}: {e.strerror} ({e.filename})") from None
    return self

  def commit(self, skip: tuple[str, ...] = ()) -> None:
    """Adds the manifest, removes the ``skip`` subfolders and moves the directory to ``out``."""
    for sub in skip:
      shutil.rmtree(os.path.join(self.path, sub), ignore_errors=True)
    manifest = {"files": file_hashes(self.path)}
    with open(os.path.join(self.path, MANIFEST_FILE), "w") as f:
      json.dump(manifest, f, indent=1, sort_keys=True)
      f.flush()
      os.fsync(f.fileno())
    old = None
    if os.path.lexists(self.out):
      old = self.out + ".replaced"
      if os.path.lexists(old):
        shutil.rmtree(old)
      os.rename(self.out, old)
    os.rename(self.path, self.out)
    self.committed = True
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)

  def _release(self) -> None:
    if self._lock_fd is not None:
      os.close(self._lock_fd)
      self._lock_fd = None

  def __exit__(self, exc_type, exc, tb) -> None:
    if self.committed:
      lock = os.path.join(self.out, LOCK_FILE)
      if os.path.exists(lock):
        os.remove(lock)
    self._release()
    if exc_type is not None and not self.keep_on_error and not self.committed:
      shutil.rmtree(self.path, ignore_errors=True)


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as indented JSON, flushed to disk (a full disk fails here, not later)."""
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
