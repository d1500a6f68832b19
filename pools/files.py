"""Small file helpers every stage shares: atomic outputs and input fingerprints.

Every output in this project is written under a temporary name in the destination folder
and renamed into place, so a killed job never leaves a half-written file that a rerun
would mistake for finished work. The temporary name says which process on which machine
writes it (``.<name>.tmp-<pid>@<host>-<random><suffixes>``), so the next run can remove what a
killed one left (`remove_stale_temporaries`) without touching a live run's files. An output
in object storage (`pools.storage.ObjectPath`) is written the same way: the temporary file is
local, uploaded under the temporary name beside the final key, then copied to the final key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterator

from pools import storage

# `.<name>.tmp-<owner>-<random><suffixes>` (atomic_path), `.<name>.runs-<owner>` (a subset's
# sorted runs) and `.uid-keys-<owner>` (spilled uid keys), where <owner> is `<pid>@<host>`
_TEMPORARY = re.compile(r"^\..*?(?:\.tmp|\.runs|uid-keys)-(?P<pid>\d+)@(?P<host>.+?)(?:-[0-9a-f]{8}(?:\..*)?)?$")


def owner_tag() -> str:
    """``<pid>@<host>``: who writes a temporary file or a spill folder."""
    return f"{os.getpid()}@{socket.gethostname()}"


def owner_is_dead(pid: int, host: str) -> bool:
    """Did the process that wrote a file end? Only this machine's processes can be asked:
    another machine's (sharing the disk) count as alive."""
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # someone else's live process
        return False
    return False


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporary files and folders in `folder` whose writer on this machine is gone
    (a killed run's); returns how many."""
    removed = 0
    folder = storage.path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*"):
        m = _TEMPORARY.match(p.name)
        if m and owner_is_dead(int(m["pid"]), m["host"]):
            if p.is_dir():
                storage.rmtree(p)
            else:
                p.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it to `path` if the block succeeds.

    For an object (`pools.storage.ObjectPath`) the temporary file is local, and the block's
    success uploads it (`pools.storage.upload_atomic`)."""
    path = storage.path(path)
    tmp_name = f".{path.name}.tmp-{owner_tag()}-{uuid.uuid4().hex[:8]}{''.join(path.suffixes)}"
    if isinstance(path, storage.ObjectPath):
        folder = Path(tempfile.mkdtemp(prefix="datacomp-upload-"))
        tmp = folder / tmp_name
        try:
            yield tmp
            storage.upload_atomic(tmp, path, tmp_name)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def file_fingerprint(path: str | os.PathLike, *, head_bytes: int = 1 << 20) -> str:
    """A cheap identity for an input file: size, mtime and a hash of its first MiB.

    Hashing whole multi-GB npz files on every run would cost more than the work it guards;
    size + mtime + head catches replaced, truncated and regenerated files.
    """
    path = storage.path(path)
    st = path.stat()
    h = hashlib.sha256()
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with path.open("rb") as f:
        h.update(f.read(head_bytes))
    return h.hexdigest()[:32]


def sha256_file(path: str | os.PathLike, *, chunk: int = 1 << 22) -> str:
    """Full sha256 of a file (for downloads and verifying what was written)."""
    h = hashlib.sha256()
    with storage.path(path).open("rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
