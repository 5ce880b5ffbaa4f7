"""A content-keyed cache of trained artifacts (models, datasets) under the user's cache directory.

An entry is one directory, ``<root>/<kind>-<key>/``, holding::

    artifact/     what was trained (a saved model, a noisy dataset, fine-tuned weights, ...)
    entry.json    kind, key, the spec the key was computed from, the training summary, the wall
                  seconds producing the artifact took, and the size and sha256 of every file
                  under artifact/ (written last)

The key is a hash of the *spec*: the config section that produced the artifact plus the keys of
the artifacts it was built from, so changing a setting upstream invalidates everything
downstream. An entry is assembled in a temporary sibling directory and renamed into place, so an
interrupted run never leaves a half-written entry under the final name; an entry whose files do
not match ``entry.json`` (a crash outside medshield, a disk error, a hand edit) is not used: it is
removed and rebuilt.

The root is :func:`medshield.models.smollm.cache_dir` (``$MEDSHIELD_CACHE_DIR``, else
``$XDG_CACHE_HOME/medshield`` or ``~/.cache/medshield``) plus a subfolder per user of the cache.

Example::

    cache = ArtifactCache(cache_dir() / "demo")
    key = ArtifactCache.key("mini-clip", {"pretrain": {...}, "seed": 0})
    entry = cache.lookup("mini-clip", key)
    if entry is None:
        summary = train_into(Path("runs/x/model"))
        entry = cache.publish("mini-clip", key, spec, Path("runs/x/model"), summary)
    model = load_model(entry.artifact)
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import medshield
from medshield.errors import DataError
from medshield.noise.craft import file_sha256
from medshield.runs import Log

FORMAT = 1
ENTRY_FILE = "entry.json"
ARTIFACT_DIR = "artifact"
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class CacheEntry:
    """A verified cache entry.

    Attributes:
        path: the entry directory.
        kind: what it holds (e.g. ``mini-clip``).
        key: the hash of its spec.
        summary: the training summary stored with it (JSON).
        seconds: the wall time producing the artifact took, in the run that published it (None
            for an entry written before medshield recorded it).
    """

    path: Path
    kind: str
    key: str
    summary: dict[str, Any]
    seconds: float | None = None

    @property
    def artifact(self) -> Path:
        """The cached artifact directory."""
        return self.path / ARTIFACT_DIR


def _files(directory: Path) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every file under ``directory``, by relative POSIX path."""
    return {
        path.relative_to(directory).as_posix(): {
            "size": path.stat().st_size,
            "sha256": file_sha256(path),
        }
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


class ArtifactCache:
    """Trained artifacts under ``root``, keyed by a hash of what produced them (module doc).

    Args:
        root: the cache directory (created on the first publish).
        log: where lookups and publications are reported.
    """

    def __init__(self, root: str | Path, log: Log = print) -> None:
        self.root = Path(root).expanduser()
        self.log = log

    @staticmethod
    def key(kind: str, spec: dict[str, Any]) -> str:
        """16 hex digits of sha256 over the kind, the cache format, medshield's version and the
        spec as canonical JSON (sorted keys)."""
        text = json.dumps(
            {"kind": kind, "format": FORMAT, "medshield": medshield.__version__, "spec": spec},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def entry_path(self, kind: str, key: str) -> Path:
        """Where the entry of ``(kind, key)`` lives (whether or not it exists)."""
        return self.root / f"{kind}-{key}"

    def lookup(self, kind: str, key: str) -> CacheEntry | None:
        """The verified entry of ``(kind, key)``, or None.

        An entry that exists but fails verification (``entry.json`` missing or unreadable, a
        file missing, of another size or another sha256) is reported, removed and treated as
        absent, so the caller rebuilds it.
        """
        path = self.entry_path(kind, key)
        if not path.exists():
            return None
        try:
            return self._verify(path, kind, key)
        except DataError as exc:
            self.log(f"cache entry {path} is not usable ({exc}); removing it and rebuilding")
            shutil.rmtree(path, ignore_errors=True)
            return None

    def _verify(self, path: Path, kind: str, key: str) -> CacheEntry:
        meta_path = path / ENTRY_FILE
        if not meta_path.is_file():
            raise DataError(f"{ENTRY_FILE} is missing")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{ENTRY_FILE} is not valid JSON: {exc}") from None
        if not isinstance(meta, dict) or (meta.get("kind"), meta.get("key")) != (kind, key):
            raise DataError(f"{ENTRY_FILE} does not describe {kind}-{key}")
        artifact = path / ARTIFACT_DIR
        expected = meta.get("files")
        if not isinstance(expected, dict) or not expected:
            raise DataError(f"{ENTRY_FILE} lists no files")
        for name, info in expected.items():
            file = artifact / name
            if not file.is_file():
                raise DataError(f"{name} is missing")
            if file.stat().st_size != info.get("size") or file_sha256(file) != info.get("sha256"):
                raise DataError(f"{name} does not match its recorded size and sha256")
        seconds = meta.get("seconds")
        seconds = float(seconds) if isinstance(seconds, (int, float)) else None
        return CacheEntry(path, kind, key, dict(meta.get("summary") or {}), seconds)

    def publish(
        self,
        kind: str,
        key: str,
        spec: dict[str, Any],
        source: str | Path,
        summary: dict[str, Any],
        seconds: float,
    ) -> CacheEntry:
        """Move the directory ``source`` into the cache as the entry of ``(kind, key)`` (a
        rename when on the same file system) and return the entry; ``seconds`` is the wall time
        producing it took, kept so a run that reuses the entry can show what it saved.

        The entry is assembled in a temporary directory next to its final place and renamed into
        place only when complete; if that fails, ``source`` is moved back. When another process
        published the same entry first, that entry is kept and returned.

        Raises:
            DataError: ``source`` is not a directory or holds no file.
        """
        source = Path(source)
        if not source.is_dir() or not any(p.is_file() for p in source.rglob("*")):
            raise DataError(f"cannot cache {source}: not a directory with files")
        self.root.mkdir(parents=True, exist_ok=True)
        self._remove_stale(kind, key)
        tmp = self.root / f"{TMP_PREFIX}{kind}-{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        final = self.entry_path(kind, key)
        try:
            shutil.move(str(source), str(tmp / ARTIFACT_DIR))
            meta = {
                "format": FORMAT,
                "kind": kind,
                "key": key,
                "medshield_version": medshield.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "spec": spec,
                "summary": summary,
                "seconds": round(seconds, 1),
                "files": _files(tmp / ARTIFACT_DIR),
            }
            (tmp / ENTRY_FILE).write_text(json.dumps(meta, indent=2, default=str) + "\n")
            try:
                tmp.rename(final)
            except OSError:
                theirs = self.lookup(kind, key)
                if theirs is None:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
                return theirs  # another process published the same entry first
        except BaseException:
            if not source.exists() and (tmp / ARTIFACT_DIR).exists():
                shutil.move(str(tmp / ARTIFACT_DIR), str(source))  # never lose the training
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.log(f"cached {kind} in {final}")
        return CacheEntry(final, kind, key, dict(summary), round(seconds, 1))

    def _remove_stale(self, kind: str, key: str) -> None:
        """Delete temporary directories of this entry left by processes that are gone."""
        for tmp in self.root.glob(f"{TMP_PREFIX}{kind}-{key}-*"):
            pid = tmp.name.removeprefix(f"{TMP_PREFIX}{kind}-{key}-").split("-")[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(tmp, ignore_errors=True)
