"""The tiny step's speed cuts keep the algorithm: thread policy and the fused AdamW."""

import os

import torch

from trainer.config import get_train_scale
from trainer.models import create_model
from trainer.train import compute_threads, make_optimizer, param_groups


def test_compute_threads_leave_the_loaders_their_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert compute_threads(None, 1, "cpu") == 1  # 2 cores, 1 loader
    assert compute_threads(None, 0, "cpu") == 2
    assert compute_threads(None, 4, "cpu") == 1  # never below one
    assert compute_threads(None, 1, "cpu", procs_per_machine=2) == 1
    assert compute_threads(3, 1, "cpu") == 3  # --threads wins
    assert compute_threads(None, 1, "cuda:0") is None  # GPUs: torch's default
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert compute_threads(None, 0, "cpu") is None  # torchrun's (or the user's) setting stays


def test_fused_adamw_takes_the_same_steps_as_the_loop():
    """The same gradients give the same update (the key bias of attention, whose gradient is
    rounding noise, makes whole training steps unsuited to compare: noise / sqrt(noise^2))."""
    budget = get_train_scale("tiny")
    torch.manual_seed(0)
    a, *_ = create_model("tiny")
    b, *_ = create_model("tiny")
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(a, budget, "cpu")
    loop = torch.optim.AdamW(param_groups(b, budget.wd), lr=budget.lr,
                             betas=(budget.beta1, budget.beta2), eps=budget.eps, foreach=False)
    assert fused.defaults["fused"] is True
    initial = a.visual.conv1.weight.detach().clone()
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        for pa, pb in zip(a.parameters(), b.parameters()):
            pa.grad = torch.randn(pa.shape, generator=g)
            pb.grad = pa.grad.clone()
        fused.step()
        loop.step()
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7, msg=lambda m: f"{k}: {m}")
    assert (a.visual.conv1.weight - initial).abs().max() > 1e-3  # three steps of lr 2e-3 moved it
