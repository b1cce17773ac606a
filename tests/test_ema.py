"""The engine's EMA against a per-tensor reference, including when the averaged module changes.

The EMA keeps its pairing of parameters between updates (walking the module tree costs more
than the update at small sizes); these tests check it against the plain formula
``e <- e + (1 - decay) (p - e)`` per tensor, in float64, and that a different module object
(a DDP wrapper, a rebuilt network) is paired again rather than read through a stale list.
"""

from __future__ import annotations

import torch
from torch import nn

from fdistill.engine.state import EMA


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).double()
    net(torch.randn(5, 3, dtype=torch.float64))  # running statistics: buffers that change
    return net


def _reference(avg: dict, module: nn.Module, weight: float) -> dict:
    params = dict(module.named_parameters())
    out = {}
    for name, value in avg.items():
        if name in params:
            out[name] = value + weight * (params[name].detach() - value)
        else:  # buffers are copied
            out[name] = module.state_dict()[name].clone()
    return out


def test_updates_follow_the_formula_and_a_new_module_is_paired_again():
    net = _net(0)
    ema = EMA(net, decay=0.9)
    ref = {k: v.clone() for k, v in ema.module.state_dict().items()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(3):  # in-place optimiser updates of the same module
        opt.zero_grad()
        net(torch.randn(5, 3, dtype=torch.float64)).square().sum().backward()
        opt.step()
        ema.update(net)
        ref = _reference(ref, net, 0.1)
    other = _net(1)  # another object: its values, not the first module's, are blended in
    ema.update(other)
    ref = _reference(ref, other, 0.1)
    wrapped = nn.ModuleDict({"inner": other}).inner  # same object through a container
    ema.update(wrapped, step=2)
    ref = _reference(ref, other, 1 - 3 / 12)
    for name, value in ema.module.state_dict().items():
        torch.testing.assert_close(value, ref[name], rtol=0, atol=1e-15)


def test_skip_leaves_the_average_unchanged():
    net = _net(0)
    ema = EMA(net, decay=0.5)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, skip=torch.tensor(True))
    for name, value in ema.module.state_dict().items():
        assert torch.equal(value, before[name])
    ema.update(net, skip=torch.tensor(False))
    p0 = dict(net.named_parameters())["0.weight"].detach()
    torch.testing.assert_close(
        ema.module.state_dict()["0.weight"], before["0.weight"] + 0.5 * (p0 - before["0.weight"])
    )
