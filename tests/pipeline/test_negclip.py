"""negCLIPLoss and NormSim (arXiv 2405.19547) against a NumPy re-statement of the formulas.

Reading implemented (filters/negclip.py, /work/shared/reference/METHODS.md): negCLIPLoss(i) =
-tau * mean over K rounds of the CLIP loss of i in its random batch, the loss being
-1/2 [log softmax_j(s_ij / tau)_i + log softmax_j(s_ji / tau)_i]; NormSim_2 = (sum_t (v.u_t)^2)^(1/2),
NormSim_inf = max_t v.u_t.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest

from filters.negclip import negclip_loss, normsim, random_batches
from pipeline.filter import main

TAU = 0.01


def _unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _log_softmax(z, axis):
    z = z - z.max(axis=axis, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=axis, keepdims=True))


def restated_negclip(img, txt, batches, tau=TAU):
    """The paper's definition, written out: the loss of every row in every batch, averaged."""
    v, t = _unit(img), _unit(txt)
    losses = np.zeros(len(v))
    for round_batches in batches:
        for b in round_batches:
            s = v[b] @ t[b].T / tau
            diag = np.arange(len(b))
            losses[b] += -0.5 * (_log_softmax(s, 1)[diag, diag] + _log_softmax(s, 0)[diag, diag])
    return -tau * losses / len(batches)


def restated_normsim(img, targets):
    sims = _unit(img) @ _unit(targets).T
    return (sims ** 2).sum(axis=1) ** 0.5, sims.max(axis=1)


def test_formulas_on_small_inputs():
    rng = np.random.default_rng(1)
    img, txt = rng.standard_normal((70, 16)), rng.standard_normal((70, 16))
    txt[:35] += 2 * img[:35]  # some matching pairs
    batches = random_batches(70, 16, 3, seed=5)
    assert all(sorted(np.concatenate(r).tolist()) == list(range(70)) for r in batches)  # each row once a round
    assert [len(b) for b in batches[0]] == [14] * 5  # near-equal batches
    ours = negclip_loss(img, txt, batches, tau=TAU, block_elements=100)  # several row blocks per batch
    np.testing.assert_allclose(ours, restated_negclip(img, txt, batches), rtol=1e-5, atol=1e-5)
    assert ours[:35].mean() > ours[35:].mean()
    again = random_batches(70, 16, 3, seed=5)
    assert all((a == b).all() for ra, rb in zip(batches, again) for a, b in zip(ra, rb))  # seeded
    targets = rng.standard_normal((40, 16))
    two, inf = normsim(img, targets, block_rows=7, block_targets=9)
    want_two, want_inf = restated_normsim(img, targets)
    np.testing.assert_allclose(two, want_two, rtol=1e-5)
    np.testing.assert_allclose(inf, want_inf, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """600 random-scores rows in 2 files; row 7 has no l14 image embedding (zeros)."""
    from pools.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("negclip") / "pool"
    generate(out, SynthConfig(samples=600, seed=13, rows_per_file=300, images=False, random_scores=True))
    path = sorted((out / "metadata").glob("*.npz"))[0]
    with np.load(path) as npz:
        arrays = {k: npz[k].copy() for k in npz.files}
    arrays["l14_img"][7] = 0
    np.savez_compressed(path, **arrays)
    targets = np.random.default_rng(2).standard_normal((25, 768)).astype(np.float32)
    np.save(out / "targets.npy", targets)
    np.save(out / "targets_b32.npy", targets[:, :512])
    return out


def _pool_arrays(pool, key):
    return np.concatenate([np.load(p)[key] for p in sorted((pool / "metadata").glob("*.npz"))]).astype(np.float32)


def test_signals_equal_the_restatement_and_recipe_runs(pool, tmp_path):
    out, signals = tmp_path / "out", tmp_path / "signals"
    stats = main(["--pool", str(pool), "--strategy", "negclip_normsim", "--targets", str(pool / "targets.npy"),
                  "--out", str(out), "--signals-dir", str(signals), "--executor", "local", "--quiet",
                  "--negclip-batch-size", "128", "--negclip-batches", "3", "--negclip-seed", "4"])
    cols = {c: np.concatenate([pq.read_table(p, columns=[c]).column(0).to_numpy(zero_copy_only=False)
                               for p in sorted(signals.glob("*.parquet"))])
            for c in ("negclip_loss_l14", "normsim2_l14", "normsim_inf_l14")}
    img, txt = _pool_arrays(pool, "l14_img"), _pool_arrays(pool, "l14_txt")
    valid = np.flatnonzero(np.abs(img).sum(1) > 0)
    assert len(valid) == 599 and np.isnan(cols["negclip_loss_l14"][7]) and np.isnan(cols["normsim_inf_l14"][7])
    batches = random_batches(len(valid), 128, 3, seed=4)
    np.testing.assert_allclose(cols["negclip_loss_l14"][valid], restated_negclip(img[valid], txt[valid], batches),
                               atol=2e-5)
    two, inf = restated_normsim(img[valid], np.load(pool / "targets.npy"))
    np.testing.assert_allclose(cols["normsim2_l14"][valid], two, rtol=1e-5)
    np.testing.assert_allclose(cols["normsim_inf_l14"][valid], inf, rtol=1e-5, atol=1e-6)
    # the recipe: negCLIPLoss's top 30% of the pool, then the top 75% of those by NormSim-inf
    in_negclip = cols["negclip_loss_l14"] >= np.sort(cols["negclip_loss_l14"][valid])[::-1][int(600 * 0.3)]
    kept_normsim = cols["normsim_inf_l14"][in_negclip]
    threshold = np.sort(kept_normsim)[::-1][int(len(kept_normsim) * 0.75)]
    expected = int((in_negclip & (cols["normsim_inf_l14"] >= threshold)).sum())
    assert stats["strategies"]["negclip_normsim"]["kept"] == expected
    assert stats["global_steps"]["negclip_l14"]["rows_without_embedding"] == 1
    # a rerun with another seed draws other batches: other values
    main(["--pool", str(pool), "--strategy", "negclip", "--out", str(tmp_path / "o2"), "--signals-dir",
          str(signals), "--executor", "local", "--quiet", "--negclip-batch-size", "128", "--negclip-batches", "3",
          "--negclip-seed", "5"])
    other = np.concatenate([pq.read_table(p, columns=["negclip_loss_l14"]).column(0).to_numpy()
                            for p in sorted(signals.glob("*.parquet"))])
    assert not np.allclose(other[valid], cols["negclip_loss_l14"][valid])


def test_targets_of_the_wrong_width_are_one_line(pool, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline.filter", "--pool", str(pool), "--strategy",
                           "negclip_normsim", "--targets", str(pool / "targets_b32.npy"), "--out", str(tmp_path / "o"),
                           "--signals-dir", str(tmp_path / "s"), "--executor", "local", "--negclip-batch-size", "64",
                           "--negclip-batches", "1"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "width 512" in proc.stderr.splitlines()[-1] and "768" in proc.stderr.splitlines()[-1]


@pytest.mark.parametrize("executor", ["processes", "ray"])
def test_the_batches_give_the_same_column_on_every_executor(pool, tmp_path, monkeypatch, executor):
    """Each random batch is a unit of a stage reading the step's copy of the embeddings: worker
    processes or Ray tasks give exactly the column of one process, and the copy is removed."""
    from pipeline.negclip import NegClipSettings, run_negclip
    from tests.pipeline.conftest import run_here_and_on

    files = sorted((pool / "metadata").glob("*.parquet"))
    settings = NegClipSettings(batch_size=100, batches=2, seed=3)  # 599 rows: 6 batches a round
    here, there, columns = run_here_and_on(executor, run_negclip, files, settings, tmp_path, monkeypatch)
    assert here == there and here["batches_per_round"] == 6 and here["rows_without_embedding"] == 1
    for a, b in columns:
        assert np.array_equal(a["negclip_loss_l14"], b["negclip_loss_l14"], equal_nan=True)
    assert sorted(p.name for p in (tmp_path / executor).iterdir()) == sorted(f"{p.stem}.npz" for p in files)
