import pytest

from pools.scales import DATACOMP_SCALES, SCALES, Scale, get_scale


def test_datacomp_pool_sizes_equal_samples_seen():
    sizes = {name: SCALES[name].pool_samples for name in DATACOMP_SCALES}
    assert sizes == {"small": 12_800_000, "medium": 128_000_000, "large": 1_280_000_000,
                     "xlarge": 12_800_000_000}
    for name in DATACOMP_SCALES:
        assert SCALES[name].samples_seen == SCALES[name].pool_samples


def test_kmeans_sample_ratio_follows_datacomp():
    assert [SCALES[n].kmeans_sample_ratio for n in DATACOMP_SCALES] == [-1, -1, 0.3, 0.03]


def test_tiny_is_a_cpu_scale():
    assert get_scale("tiny").on_cpu


def test_unknown_scale_lists_the_known_ones():
    with pytest.raises(ValueError, match="tiny, small, medium, large, xlarge"):
        get_scale("huge")


def test_invalid_scale_rejected():
    with pytest.raises(ValueError):
        Scale(name="x", pool_samples=0, samples_seen=1, kmeans_sample_ratio=-1, num_centroids=1)
