import io
import tarfile

import pytest
import torch

from tests.trainer.conftest import write_resharded
from trainer.data import (ShardStream, StreamSpec, epoch_loader, epoch_plan, expand_shards,
                          iter_tar_samples, rank_share)
from trainer.models import create_model


@pytest.mark.parametrize("seen,batch,epochs", [(12_800_000, 4096, 5), (12_800_000_000, 90112, 8),
                                               (1000, 64, 3), (640, 64, 10)])
def test_epoch_plan_sums_to_the_budget_exactly(seen, batch, epochs):
    plan = epoch_plan(seen, batch, epochs)
    assert len(plan) == epochs and sum(map(sum, plan)) == seen
    flat = [n for e in plan for n in e]
    assert all(n == batch for n in flat[:-1]) and 0 < flat[-1] <= batch
    assert max(map(len, plan)) - min(map(len, plan)) <= 2


def test_epoch_plan_rejects_fewer_steps_than_intervals():
    with pytest.raises(ValueError, match="fewer than"):
        epoch_plan(100, 64, 5)


def test_rank_share_splits_a_batch():
    assert [rank_share(10, 3, r) for r in range(3)] == [4, 3, 3]
    assert sum(rank_share(4096, 8, r) for r in range(8)) == 4096


def test_expand_shards_reads_folders_patterns_and_resharded_output(train_pool, tmp_path):
    shards = expand_shards(str(train_pool / "shards"))
    assert [s.rsplit("/", 1)[-1] for s in shards] == [f"{i:08d}.tar" for i in range(len(shards))]
    assert expand_shards(str(train_pool)) == shards  # a pool root
    pattern = str(train_pool / "shards" / "{00000000..00000001}.tar")
    assert expand_shards(pattern) == shards[:2]
    n = write_resharded([train_pool / "shards" / "00000000.tar"], tmp_path / "rs", keep=30,
                        repeats=2, shard_size=25)
    assert n == 60
    rs = expand_shards(str(tmp_path / "rs"))
    assert len(rs) == 3
    assert expand_shards(f"{tmp_path / 'rs'}::{pattern}") == rs + shards[:2]
    keys = [k for k, _ in iter_tar_samples(rs[0])]
    assert keys[0].endswith("-0") and keys[1].endswith("-1") and keys[0][:-2] == keys[1][:-2]
    (tmp_path / "rs" / "00000002.tar").unlink()
    with pytest.raises(FileNotFoundError, match="meta.json lists 3 shards but 1 are missing"):
        expand_shards(str(tmp_path / "rs"))


def _tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_bad_samples_are_skipped_and_counted(train_pool, tmp_path):
    good = [(k, s) for k, s in iter_tar_samples(str(train_pool / "shards" / "00000000.tar"))][:4]
    members = [("bad1.jpg", b"not a jpeg"), ("bad1.txt", b"x"),  # undecodable image
                ("bad2.txt", b"caption only"),  # no image
                ("bad3.jpg", good[0][1]["jpg"])]  # no caption
    for k, s in good:
        members += [(f"{k}.jpg", s["jpg"]), (f"{k}.txt", s["txt"])]
    _tar(tmp_path / "00000000.tar", members)
    _, pre, _, tok = create_model("tiny")
    spec = StreamSpec(shards=(str(tmp_path / "00000000.tar"),), seed=0, epoch=0, rank=0,
                      local_batches=(8,), shuffle_buffer=0)
    [(step, images, texts, counts)] = list(ShardStream(spec, pre, tok))
    assert step == 0 and images.shape == (8, 3, 32, 32) and texts.shape[0] == 8
    assert counts["samples"] == 8
    # 8 samples need two passes over the 4 good ones; each pass meets the 3 bad samples first
    assert counts["skipped_bad_image"] == counts["skipped_no_image"] == counts["skipped_no_caption"] == 2
    assert counts["shards_opened"] == 2


def test_streams_are_reproducible_and_differ_by_epoch_and_rank(train_pool):
    _, pre, _, tok = create_model("tiny")
    shards = tuple(expand_shards(str(train_pool)))

    def tokens(epoch, rank, workers):
        spec = StreamSpec(shards=shards, seed=0, epoch=epoch, rank=rank,
                          local_batches=(16, 16, 16, 8), shuffle_buffer=50)
        batches = list(epoch_loader(spec, pre, tok, workers))
        assert [b[0] for b in batches] == [0, 1, 2, 3]
        assert [len(b[1]) for b in batches] == [16, 16, 16, 8]
        return torch.cat([b[2] for b in batches]), torch.cat([b[1] for b in batches])

    t0, i0 = tokens(0, 0, 2)
    t0b, i0b = tokens(0, 0, 2)
    assert torch.equal(t0, t0b) and torch.equal(i0, i0b)  # crops are seeded too
    assert not torch.equal(t0, tokens(1, 0, 2)[0])
    assert not torch.equal(t0, tokens(0, 1, 2)[0])
