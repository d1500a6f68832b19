"""Reading webdataset tars as DataComp's resharder does: samples in order, files as raw bytes.

Used by every stage that streams a pool's shards (`pipeline.reshard`, `pipeline.score`,
`pipeline.report`); nothing is decoded. A shard may be an object (``s3://...``): it is streamed.
"""

from __future__ import annotations

import re
import tarfile
import zlib
from typing import Iterator, MutableMapping

from pools import storage
from pools.format import PoolFormatError


# A member name a pool's shard may hold: <key>.<ext>, no folder, no leading dot, printable
# ASCII. img2dataset writes exactly such names; anything else (``../../x.jpg``, ``/etc/x.json``,
# ``a/b.jpg``) is skipped and counted, so a crafted tar cannot pose as extra copies of a sample.
_PLAIN_MEMBER = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_\-.]*\.[A-Za-z0-9_.\-]+$")
MEMBERS_SKIPPED = "members_skipped_bad_name"  # the counter iter_samples adds skipped members to


def is_plain_member(name: str) -> bool:
    """Is `name` a flat ``<key>.<ext>`` tar member name (no folder, no ``..``)?"""
    return bool(_PLAIN_MEMBER.match(name)) and ".." not in name


def _split_name(name: str) -> tuple[str | None, str]:
    """webdataset's key/extension split: the key is the path up to the basename's first dot."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, ""
    return name[:dot], name[dot + 1:]


def iter_samples(path: str, counts: MutableMapping[str, int] | None = None
                 ) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """Stream a webdataset tar: yield (key, [(extension, raw bytes), ...]) per sample.

    Consecutive files with the same key form one sample; a repeated extension starts a new
    sample (the reference's non-throwing group-by-key). Members whose name is not a plain
    ``<key>.<ext>`` are skipped and counted in ``counts[MEMBERS_SKIPPED]`` when `counts` is
    given. A file that is not a readable tar raises `PoolFormatError` naming it. (A tar cut
    at a member boundary reads as a shorter tar: only its ``_stats.json`` can tell.)
    """
    try:
        yield from _samples(path, counts)
    except storage.StorageError:
        raise  # the store failed the request (its message names the URI): the tar may be fine
    except (tarfile.TarError, EOFError, OSError, zlib.error) as exc:
        raise PoolFormatError(f"{path}: not a readable tar ({type(exc).__name__}: {exc}); re-download it, "
                              "or move it and its _stats.json out of the shards folder") from None


def _samples(path: str, counts: MutableMapping[str, int] | None) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    with storage.open_stream(path) as f, tarfile.open(fileobj=f, mode="r|") as tar:
        key, files = None, []
        for member in tar:
            if not member.isfile():
                continue
            if not is_plain_member(member.name):
                if counts is not None:
                    counts[MEMBERS_SKIPPED] = counts.get(MEMBERS_SKIPPED, 0) + 1
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
