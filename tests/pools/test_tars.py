"""Reading shards: samples grouped by key; a file that is not a readable tar is named."""

import gzip
import io
import tarfile

import numpy as np
import pytest

from pools.format import PoolFormatError
from pools.tars import MEMBERS_SKIPPED, iter_samples


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_samples_in_order_grouped_by_key(tmp_path):
    path = _tar(tmp_path / "0.tar", [("a.jpg", b"1"), ("a.json", b"{}"), ("b.jpg", b"2"), ("b.jpg", b"3"),
                                     ("c.txt", b"t")])
    assert list(iter_samples(str(path))) == [("a", [("jpg", b"1"), ("json", b"{}")]), ("b", [("jpg", b"2")]),
                                             ("b", [("jpg", b"3")]), ("c", [("txt", b"t")])]


def test_members_that_are_not_plain_names_are_skipped_and_counted(tmp_path):
    """A crafted tar's ``../../x.json`` must not become a sample (an extra copy of a real uid)."""
    path = _tar(tmp_path / "0.tar", [("a.jpg", b"1"), ("a.json", b'{"uid": "1"}'), ("../../a.jpg", b"2"),
                                     ("../../a.json", b'{"uid": "1"}'), ("/abs/b.txt", b"t"), ("dir/c.txt", b"t"),
                                     (".hidden.jpg", b"h"), ("noext", b"x"), ("d.txt", b"d")])
    counts = {}
    assert list(iter_samples(str(path), counts)) == [("a", [("jpg", b"1"), ("json", b'{"uid": "1"}')]),
                                                     ("d", [("txt", b"d")])]
    assert counts == {MEMBERS_SKIPPED: 6}


@pytest.mark.parametrize("damage", ["empty", "random", "gzip_of_text"])
def test_a_file_that_is_not_a_tar_is_named(tmp_path, damage):
    path = tmp_path / "00000007.tar"
    path.write_bytes({"empty": b"", "random": np.random.default_rng(1).bytes(5000),
                      "gzip_of_text": gzip.compress(b"hello " * 200)}[damage])
    with pytest.raises(PoolFormatError, match=rf"^{path}: not a readable tar \(.*\); re-download it"):
        list(iter_samples(str(path)))
