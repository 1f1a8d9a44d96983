"""The sharded-data-parallel benchmark (benchmarks/sharded_dp.py): its memory
tracker counts what it should, and its --quick run measures what sharding
must show (structural facts only: no timings)."""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sharded_dp  # noqa: E402


def test_step_memory_counts_each_live_storage_once_by_category():
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 8)).sum().backward()
    opt.step()
    numel = sum(p.numel() for p in model.parameters())
    probe = sharded_dp.StepMemory(model, opt)
    steady = probe.breakdown()
    # AdamW: exp_avg and exp_avg_sq per parameter, plus a float32 step scalar per parameter
    assert steady == {"params": 4 * numel, "gathered": 0, "grads": 4 * numel, "block_grads": 0,
                      "optim": 8 * numel + 4 * 2, "comm": 0, "other": 0}
    with probe:
        a = torch.zeros(1000)
        v = a.view(10, 100)
        v.add_(1)  # in place on a view: the same storage, counted once
        assert probe.breakdown()["other"] == 4000
        del a, v  # freed: no longer counted
        b = torch.zeros(500)
        assert probe.breakdown()["other"] == 2000
    assert probe.peak["other"] == 4000
    assert probe.peak_state == 16 * numel + 8 and b.numel() == 500
    assert probe.peak_total == probe.peak_state + 4000


@pytest.mark.timeout(240)
def test_quick_run_shows_sharded_state_below_unsharded(monkeypatch):
    written = {}
    monkeypatch.setattr(sharded_dp, "write_json", lambda name, payload: written.setdefault(name, payload))
    payload = sharded_dp.main(["--quick"])
    assert not written and payload["args"]["no_write"]  # a smoke run writes nothing
    (res,) = payload["results"]  # dp=2, 4 layers
    assert (res["dp"], res["layers"]) == (2, 4)
    none, grads, params = (res["per_rank"][lv]["ranks"] for lv in ("none", "grads", "params"))
    numel, block = none[0]["numel"], none[0]["block_bytes"]
    assert all(r["numel"] == numel for r in grads + params)
    root = (2 * 256 * 64 + 64) * 4  # embedding, head and final norm of the quick model (vocab 256, dim 64)
    for level in (none, grads, params):  # same weights, same data: the same loss at every level
        assert level[0]["loss"] == pytest.approx(none[0]["loss"], rel=1e-5)
    for n, g, p in zip(none, grads, params):  # each rank
        n, g, p = n["memory"], g["memory"], p["memory"]
        assert n["steady"] == {"params": 4 * numel, "gathered": 0, "grads": 4 * numel, "block_grads": 0,
                               "optim": 8 * numel + 4 * none[0]["tensors"]}
        for sharded in (g, p):  # params, grads and AdamW state: half of each, give or take row padding
            assert sharded["steady"]["gathered"] == sharded["steady"]["block_grads"] == 0
            for cat in ("params", "grads"):
                assert 0 < sharded["steady"][cat] <= 0.55 * n["steady"][cat]
            assert sharded["peak_state"] < n["peak_state"]
        assert n["peak"]["gathered"] == n["peak"]["block_grads"] == 0
        assert 0 < p["peak"]["block_grads"] <= 2 * block  # a block's unsharded gradients until reduce-scattered
        assert g["peak"]["gathered"] >= 4 * numel  # ZeRO-2: the whole model gathered during the step
        assert p["peak"]["gathered"] <= root + 2 * block  # ZeRO-3: the root and at most two blocks at once
        assert p["peak_state"] < g["peak_state"]
        for m in (n, g, p):  # the CPU allocator's own count sees at least what the tracker sees
            assert m["allocator_peak"] >= m["peak_total"] > m["peak_state"]
    summary = res["levels"]
    assert summary["none"]["state_vs_unsharded"] == 1.0
    assert summary["params"]["state_vs_unsharded"] < 0.75
    assert summary["params"]["target"] == pytest.approx(1.1 / 2 * summary["none"]["peak_state"] + block)
    sweep = payload["sweep"]["2"]
    budget = payload["args"]["budget_mib"] * 2 ** 20
    for level in ("none", "params"):
        s = sweep[level]
        assert s["layers"] >= 1 and s["peak_total"] <= budget
        over = [pr for pr in s["probes"] if pr["layers"] == s["layers"] + 1]
        assert over and over[0]["peak_total"] > budget  # one more layer did not fit
    assert sweep["params"]["layers"] > sweep["none"]["layers"]
