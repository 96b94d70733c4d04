"""Elementwise rules fed in cache-sized chunks stay bitwise equal to torch.optim."""

from __future__ import annotations

import copy

import pytest
import torch
import zero_workers as w

import shardopt
from shardopt.rules import base


@pytest.fixture
def tiny_chunks(monkeypatch):
    # 7 elements: every parameter of TinyLM is cut into many pieces, some uneven.
    monkeypatch.setattr(base, "CPU_CHUNK_NUMEL", 7)


@pytest.mark.parametrize(("name", "ours", "reference", "hp"), w.CASES, ids=[c[0] for c in w.CASES])
def test_chunked_single_process_equals_torch_bitwise(tiny_chunks, name, ours, reference, hp):
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    opt, ref_opt = ours(model.parameters(), **hp), reference(ref.parameters(), **hp)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            w.lm_loss(m, w.batch(step)).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    if "step" in next(iter(ref_opt.state.values()), {}):
        # The step advanced once per parameter, not once per piece.
        assert all(float(s["step"]) == 5 for s in opt.state.values())


def test_chunked_zero_optimizer_equals_torch_bitwise(tiny_chunks):
    torch.manual_seed(0)
    model = w.TinyLM()
    ref = copy.deepcopy(model)
    opt = shardopt.ZeroOptimizer(model.parameters(), shardopt.Adam, lr=0.01, amsgrad=True)
    ref_opt = torch.optim.Adam(ref.parameters(), lr=0.01, amsgrad=True)
    for step in range(5):
        for m, o in ((model, opt), (ref, ref_opt)):
            w.lm_loss(m, w.batch(step)).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))
    assert float(opt.full_state_dict()["state"][0]["step"]) == 5
