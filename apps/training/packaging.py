"""Model and checkpoint directories as single, reproducible tar files in the artifact store."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path


def pack_dir(source: Path, target: Path) -> tuple[str, int]:
    """Tar ``source`` deterministically (sorted names, zeroed times and owners).

    The same files give the same bytes, so the sha256 identifies the model, not the moment
    it was packed. Returns (sha256, size).
    """
    with tarfile.open(target, "w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            info = tar.gettarinfo(str(path), arcname=str(path.relative_to(source)))
            info.mtime = 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            info.mode = 0o644
            with path.open("rb") as fh:
                tar.addfile(info, fh)
    digest = hashlib.sha256()
    with target.open("rb") as fh:
        while chunk := fh.read(1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest(), target.stat().st_size


def unpack(archive: Path, target: Path) -> Path:
    """Extract a tar made by ``pack_dir``; refuses links and paths that leave ``target``."""
    target.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target
