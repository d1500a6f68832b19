"""Reading webdataset tars as DataComp's resharder does: samples in order, files as raw bytes.

Used by every stage that streams a pool's shards (`pipeline.reshard`, `pipeline.score`,
`pipeline.report`); nothing is decoded.
"""

from __future__ import annotations

import tarfile
import zlib
from typing import Iterator

from pools.format import PoolFormatError


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key/extension split: the key is the path up to the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, ""
    return name[:dot], name[dot + 1:]


def iter_samples(path: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Stream a webdataset tar: yield (key, [(extension, raw bytes), ...]) per sample.

    Consecutive files with the same key form one sample; a repeated extension starts a new
    sample (the reference's non-throwing group-by-key). A file that is not a readable tar
    raises `PoolFormatError` naming it. (A tar cut at a member boundary reads as a shorter
    tar: only its ``_stats.json`` can tell.)
    """
    try:
        yield from _samples(path)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PoolFormatError(f"{path}: not a readable tar ({type(exc).__name__}: {exc}); re-download it, "
                              "or move it and its _stats.json out of the shards folder") from None


def _samples(path: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    with tarfile.open(path, mode="r|") as tar:
        key, files = None, []
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_name(member.name)
            if k is None:
                continue
            data = tar.extractfile(member).read()
            if k != key or any(e == ext for e, _ in files):
                if files:
                    yield key, files
                key, files = k, []
            files.append((ext, data))
        if files:
            yield key, files
