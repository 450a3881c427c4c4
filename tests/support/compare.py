"""Assertions that two trainings of one spec (packed and alone, two runs) agree."""

from __future__ import annotations

import pytest
import torch

from qgen_ray import schema

ROW_KEYS = ["train_loss", "train_acc", "test_loss", "test_acc", "gap_loss", "best_epoch"]


def assert_trained_alike(got: dict, want: dict, rel: float) -> None:
    """Two result rows of one model: same id and status, history, summary and steps
    within `rel` (relative, and absolute near zero)."""
    assert got["model_id"] == want["model_id"] and got["status"] == want["status"]
    assert len(got["history"]) == len(want["history"])
    for g, w in zip(got["history"], want["history"], strict=True):
        for key in ("train_loss", "train_acc", "lr"):
            assert g[key] == pytest.approx(w[key], rel=rel, abs=rel), (g["epoch"], key)
    for key in ROW_KEYS:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=rel), key
    steps = [(s["layer"], s["step"]) for s in got["steps"]]
    wanted = [(s["layer"], s["step"]) for s in want["steps"]]
    assert [name for name, _ in steps] == [name for name, _ in wanted]
    assert [v for _, v in steps] == pytest.approx([v for _, v in wanted], rel=rel)


def assert_same_checkpoints(got_trial, want_trial, rtol: float) -> None:
    """`init.pt` and `final.pt` of two trial stores hold the same tensors."""
    for which in (schema.INIT_CKPT, schema.FINAL_CKPT):
        got, want = got_trial.load(which), want_trial.load(which)
        assert got.keys() == want.keys()
        for name in got:
            torch.testing.assert_close(got[name], want[name], rtol=rtol, atol=rtol * 1e-3)
