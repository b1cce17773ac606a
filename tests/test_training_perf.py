"""Speed machinery of the training loops, checked on the CPU against independent references.

* bf16 autocast: the f-distill losses and gradients against the float32 computation, and a
  short bf16 run against the float32 run from the same start.
* Gradient accumulation (``batch_gpu``): against the whole batch in one pass.
* NaN/Inf: a NaN injected at a known step stops the run naming that step, with the networks
  as a clean run left them after the step before; no host synchronisation between logging steps.
* ``torch.compile``: against eager, and no recompilation after the first step.
"""

from __future__ import annotations

import collections
import copy
import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fdistill import rng
from fdistill.critic import MultiScaleHead
from fdistill.denoisers import MLP, EDMLoss, EDMPrecond, UNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.loss import FDistillWeights
from fdistill.training import (
    Dist,
    FiniteGuard,
    MicroBatches,
    NonFiniteError,
    TeacherTrainConfig,
    TrainConfig,
    autocast,
    bf16_supported,
    compile_supported,
    host_stats,
    make_batch_randoms,
    merge_stats,
    train_distill,
    train_teacher,
)

ROOT = Path(__file__).resolve().parents[1]
DATA = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)).clamp(-1, 1)


# --------------------------------------------------------------------------- helpers
def _unet(seed: int = 0, res: int = 8, ch: int = 1, mc: int = 8, attn=()) -> EDMPrecond:
    torch.manual_seed(seed)
    net = UNet(res, ch, model_channels=mc, channel_mult=(1, 2), attn_resolutions=attn)
    for p in net.parameters():  # a trained-looking net: the zero-initialised output too
        nn.init.normal_(p, std=0.1)
    return EDMPrecond(net)


def _distill(teacher: nn.Module, disc: str = "fake", fake_noise: float = 0.0, **loss) -> FDistill:
    """FDistill as the method starts it: student and fake score copies of the teacher (the
    fake score moved by ``fake_noise``, as after some training, so the two scores differ)."""
    torch.manual_seed(1)
    fake = copy.deepcopy(teacher).requires_grad_(True)
    with torch.no_grad():
        for p in fake.parameters():
            p.add_(fake_noise * torch.randn_like(p))
    head = MultiScaleHead.for_network(fake if disc == "fake" else teacher, hidden=16)
    for p in head.parameters():  # logits that vary, so h and the normaliser do something
        nn.init.normal_(p, std=0.3)
    return FDistill(
        teacher=teacher,
        generator=OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True), sigma_init=80.0),
        fake_score=fake,
        head=head,
        divergence=get_divergence("js"),
        cfg=LossConfig(disc_features=disc, **loss),
    )


def _image_samplers(shape=(1, 8, 8), data=DATA):
    def sample_real(n, gen):
        return data[rng.randint(len(data), (n,), gen)], None

    def sample_latents(n, gen):
        return rng.randn((n, *shape), gen), None

    return sample_real, sample_latents


def _gens(seed: int = 0):
    return make_batch_randoms(seed, Dist())


def _dist(a: nn.Module, b: nn.Module) -> float:
    """Euclidean distance between two modules' parameters."""
    pa, pb = list(a.parameters()), list(b.parameters())
    return torch.sqrt(sum(((x - y).float() ** 2).sum() for x, y in zip(pa, pb, strict=True))).item()


def _max_diff(a: nn.Module, b: nn.Module) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def _flat_grads(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params if p.grad is not None])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# --------------------------------------------------------------------------- precision
def test_autocast_and_compile_are_available_on_cpu():
    cpu = torch.device("cpu")
    assert bf16_supported(cpu) and compile_supported(cpu)
    a = torch.randn(4, 4)
    with autocast(cpu, True):
        assert (a @ a).dtype == torch.bfloat16
    with autocast(cpu, False):
        assert (a @ a).dtype == torch.float32


def _losses_and_grads(model: FDistill, bf16: bool, z, x_real):
    """Critic and generator loss, statistics and flat gradients, at fixed random draws."""
    out = {}
    cases = {
        "critic": (
            lambda g: model.critic_loss(z, None, x_real, None, g),
            model.critic_parameters(),
        ),
        "generator": (
            lambda g: model.generator_loss(z, None, g),
            list(model.generator.parameters()),
        ),
    }
    for name, (fn, params) in cases.items():
        with autocast(torch.device("cpu"), bf16):
            loss, stats = fn(torch.Generator().manual_seed(5))
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([g.reshape(-1) for g in grads if g is not None])
        out[name] = (loss.detach(), stats, flat)
    return out


def test_bf16_losses_and_gradients_stay_close_to_fp32():
    """bf16 networks, fp32 ratio/h/reductions: losses within 1%, gradients within 5% (norm).

    Measured on this UNet (critic / generator): losses 1.7e-4 / 2.2e-4 relative, gradients
    2.3% / 1.7%, cosine 0.9998 / 0.99995; h_min, h_max 1e-4. An ``h`` rounded to bf16 (8-bit
    mantissa) would be off by 1.7e-3 / 2.1e-3 here and miss the 5e-4 bound.
    """
    model = _distill(_unet(res=16, ch=3, mc=16, attn=(8,)), gan_weight=1e-2)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(8, 3, 16, 16, generator=g)
    x_real = torch.randn(8, 3, 16, 16, generator=g).clamp(-1, 1)
    ref = _losses_and_grads(model, False, z, x_real)
    low = _losses_and_grads(model, True, z, x_real)
    for name in ref:
        (l32, _, g32), (l16, _, g16) = ref[name], low[name]
        assert l16.dtype == torch.float32  # the reductions are float32
        assert abs(l16 - l32) / abs(l32) < 1e-2, name
        assert _rel(g16, g32) < 5e-2, name
        assert F.cosine_similarity(g16, g32, dim=0) > 0.995, name
        assert not torch.equal(g16, g32), f"{name}: autocast changed nothing"
    for key in ("h_min", "h_mean", "h_max"):
        a, b = low["generator"][1][key], ref["generator"][1][key]
        assert abs(a - b) <= 5e-4 * abs(b), key


def test_bf16_training_run_tracks_fp32():
    """A short bf16 distillation stays finite and near the fp32 run from the same start
    (measured: 0.9% of the distance the generator moved; asserted: 5%)."""
    runs = {}
    init = None
    for bf16 in (False, True):
        model = _distill(_unet(), gan_weight=1e-2)
        init = init or copy.deepcopy(model.generator)
        cfg = TrainConfig(
            steps=12, batch=8, critic_ratio=2, lr_gen=1e-3, lr_critic=1e-3, progress=False
        )
        train_distill(model, *_image_samplers(), replace(cfg, bf16=bf16), gens=_gens())
        runs[bf16] = model.generator
    moved = _dist(runs[False], init)
    apart = _dist(runs[True], runs[False])
    assert all(torch.isfinite(p).all() for p in runs[True].parameters())
    assert moved > 1e-2
    assert apart < 0.05 * moved, (apart, moved)


# --------------------------------------------------------------------------- accumulation
def _train_teacher(batch_gpu: int | None, steps: int = 3, seed: int = 0) -> nn.Module:
    net = _unet()
    cfg = TeacherTrainConfig(steps=steps, batch=8, batch_gpu=batch_gpu, lr=1e-3, progress=False)
    train_teacher(net, _image_samplers()[0], cfg, gens=_gens(seed))
    return net


def test_accumulation_equals_the_whole_batch():
    """4 micro-batches of 2 give the run of one batch of 8 (teacher and distillation)."""
    init = _unet()
    whole, micro = _train_teacher(None), _train_teacher(2)
    other = _train_teacher(None, seed=1)  # other draws: what a wrong split looks like
    assert _max_diff(micro, whole) < 1e-5
    assert _max_diff(other, whole) > 1e-3 and _max_diff(whole, init) > 1e-3

    out = {}
    for bg in (None, 2):
        model = _distill(_unet(), gan_weight=1e-2, normalize=False)
        cfg = TrainConfig(steps=2, batch=8, batch_gpu=bg, critic_ratio=2, progress=False)
        train_distill(model, *_image_samplers(), cfg, gens=_gens())
        out[bg] = model
    for part in ("generator", "fake_score", "head"):
        d = _max_diff(getattr(out[2], part), getattr(out[None], part))
        assert d < 1e-5, (part, d)


def _generator_update_grads(model: FDistill, k: int, n: int = 16) -> torch.Tensor:
    """Generator gradient of one update of ``n`` samples in ``k`` micro-batches, as the loop
    takes it (each micro-batch's mean loss / k, its rows of the same random draws)."""
    gens = _gens(4)
    sample_latents = _image_samplers()[1]
    model.generator.zero_grad(set_to_none=True)
    for _ in MicroBatches(gens, k):
        z, c = sample_latents(n // k, gens["noise"])
        loss, _ = model.generator_loss(z, c, gens["noise"])
        (loss / k).backward()
    return _flat_grads(model.generator.parameters())


def test_accumulation_with_ratio_normaliser_deviation_is_bounded():
    """The normaliser's means are per micro-batch: the gradient deviates, boundedly.

    Without the normaliser the accumulated gradient is the whole batch's (measured 1.4e-7
    relative); with it, 2 micro-batches of 8 measured 5e-4 off in norm (4 of 4: 1.4e-3),
    cosine 1.0 to 7 digits. Asserted: between 1e-5 (the test sees the normaliser) and 2e-2.
    The deviation grows with the spread of the logits within a noise-level bin.
    """
    exact = _distill(_unet(), fake_noise=0.02, gan_weight=0.0, normalize=False)
    whole, micro = _generator_update_grads(exact, 1), _generator_update_grads(exact, 2)
    assert _rel(micro, whole) < 1e-5
    model = _distill(_unet(), fake_noise=0.02, gan_weight=0.0, normalize=True)
    whole, micro = _generator_update_grads(model, 1), _generator_update_grads(model, 2)
    dev = _rel(micro, whole)
    assert 1e-5 < dev < 2e-2, dev
    assert F.cosine_similarity(micro, whole, dim=0) > 0.999


def test_batch_gpu_must_divide_the_per_process_batch():
    cfg = TeacherTrainConfig(steps=1, batch=8, batch_gpu=3, progress=False)
    with pytest.raises(ValueError, match="batch-gpu 3 must divide the per-process batch 8"):
        train_teacher(_unet(), _image_samplers()[0], cfg, gens=_gens())


# --------------------------------------------------------------------------- NaN, host syncs
def test_statistics_merge_over_micro_batches_and_reach_the_host_once():
    """Means, minima, maxima and binned (sum, count) statistics of two micro-batches."""
    a = {
        "loss": torch.tensor(1.0),
        "h_min": torch.tensor(0.5),
        "h_max": 3.0,
        "gap/bins": torch.tensor([[2.0, 0.0, 6.0], [2.0, 0.0, 3.0]]),
    }
    b = {
        "loss": torch.tensor(3.0),
        "h_min": torch.tensor(0.25),
        "h_max": 2.0,
        "gap/bins": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
    }
    merged = merge_stats([a, b])
    assert isinstance(merged["loss"], torch.Tensor)  # still on the device
    # bin 0: (2 + 1) / (2 + 1); bin 1 has no samples; bin 2: 6 / 3
    expect = {"loss": 2.0, "h_min": 0.25, "h_max": 3.0, "gap/bin0": 1.0, "gap/bin2": 2.0}
    assert host_stats(merged) == expect
    guard = FiniteGuard(torch.device("cpu"))
    keys, flags = guard.nonfinite(merged | {"gap/bins": torch.tensor([[float("nan")], [1.0]])})
    assert dict(zip(keys, flags.tolist(), strict=True)) == {
        "loss": False,
        "h_min": False,
        "gap/bins": True,
        "h_max": False,
    }


class _Poisoned:
    """A loss that turns NaN at its ``at``-th call (1-based), otherwise ``fn``'s."""

    def __init__(self, fn, at: int):
        self.fn, self.at, self.calls = fn, at, 0

    def __call__(self, *a, **kw):
        self.calls += 1
        out = self.fn(*a, **kw)
        if self.calls != self.at:
            return out
        if isinstance(out, tuple):
            return out[0] * float("nan"), out[1]
        return out * float("nan")


def test_nan_stops_the_teacher_at_its_step(tmp_path):
    """NaN in step 3 of 8 (logging every 5, checkpoints every 2): the run stops naming step 3,
    the network, AdamW and EMA hold what a clean 2-step run gives, no checkpoint after step 2."""
    cfg = TeacherTrainConfig(
        steps=8, batch=8, lr=1e-3, log_every=5, ckpt_every=2, progress=False, ema_decay=0.9
    )
    clean = _unet()
    clean_ema = train_teacher(clean, _image_samplers()[0], replace(cfg, steps=2), gens=_gens())
    net = _unet()
    loss_fn = _Poisoned(EDMLoss(), at=3)
    emas = []
    with pytest.raises(NonFiniteError, match="non-finite loss, grad_norm at step 3"):
        train_teacher(
            net,
            _image_samplers()[0],
            cfg,
            tmp_path,
            loss_fn=loss_fn,
            gens=_gens(),
            on_step=lambda done, ema: emas.append(ema),
        )
    assert loss_fn.calls == 4  # it ran on to the checkpoint step, where it stopped
    assert _max_diff(net, clean) == 0
    assert _max_diff(emas[-1].module, clean_ema.module) == 0
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 2


def test_nan_stops_distillation_at_its_step():
    """NaN in the generator update of step 3: stops naming step 3 (at logging step 4), the
    generator and its EMA as a clean 2-step run left them."""
    cfg = TrainConfig(steps=6, batch=8, critic_ratio=2, log_every=4, progress=False)
    clean = _distill(_unet(), gan_weight=1e-2)
    clean_ema = train_distill(clean, *_image_samplers(), replace(cfg, steps=2), gens=_gens())
    model = _distill(_unet(), gan_weight=1e-2)
    model.generator_loss = _Poisoned(model.generator_loss, at=3)
    emas = []
    # The statistics are taken before the loss is poisoned: only the gradient is NaN.
    with pytest.raises(NonFiniteError, match="non-finite grad_norm_gen at step 3"):
        train_distill(
            model, *_image_samplers(), cfg, gens=_gens(), on_step=lambda d, e: emas.append(e)
        )
    assert len(emas) == 3  # steps 1-3 ran to the end; step 4 (a logging step) raised
    assert _max_diff(model.generator, clean.generator) == 0
    assert _max_diff(emas[-1].module, clean_ema.module) == 0


class _Net(nn.Module):
    def __init__(self, dim: int = 4, out: int | None = None):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, 16), nn.SiLU(), nn.Linear(16, out or dim))

    def forward(self, x, cond=None):
        return self.body(x)


class _StubDistill(FDistill):
    """f-distill's plan (critic phase, then generator phase) over stub networks and losses, with
    statistics as 0-dim tensors."""

    def __init__(self):
        nn.Module.__init__(self)
        self.cfg = LossConfig()
        torch.manual_seed(0)
        self.teacher = _Net().requires_grad_(False)
        self.generator, self.fake_score, self.head = _Net(), _Net(), _Net(out=1)
        self.weights = FDistillWeights(get_divergence("rkl"))  # no normaliser

    def critic_parameters(self):
        return [*self.fake_score.parameters(), *self.head.parameters()]

    def critic_loss(self, z, cond, x_real, cond_real, gen, *, x_student=None):
        with torch.no_grad():
            x = self.generator(z)
        x_t = x + rng.randn(x.shape, gen)
        dsm = (self.fake_score(x_t) - x).pow(2).mean(1)
        disc = F.softplus(-self.head(x_real)) + F.softplus(self.head(x))
        return (dsm + disc.squeeze(1)).mean(), {"loss_dsm": dsm.mean(), "loss_disc": disc.mean()}

    def generator_loss(self, z, cond, gen, *, x_student=None):
        x = self.generator(z)
        for p in self.critic_parameters():
            p.requires_grad_(False)
        loss = (x - self.teacher(x.detach())).pow(2).mean(1) + F.softplus(-self.head(x))[:, 0]
        for p in self.critic_parameters():
            p.requires_grad_(True)
        return loss.mean(), {"loss_dm": loss.mean()}


_SYNCS = ("item", "tolist", "__float__", "__bool__", "__int__", "__index__", "numpy")


def _count_syncs(monkeypatch) -> collections.Counter:
    """Count the tensor-to-host conversions (what waits for a GPU) from here on."""
    calls: collections.Counter = collections.Counter()
    for name in _SYNCS:
        real = getattr(torch.Tensor, name)

        def wrapped(self, *a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(self, *a, **kw)

        monkeypatch.setattr(torch.Tensor, name, wrapped)
    return calls


def test_no_host_sync_between_logging_steps(monkeypatch):
    """Both loops, with accumulation: tensor-to-host conversions only at logging steps."""
    counts = {}
    calls = _count_syncs(monkeypatch)

    def recorder(name):
        counts[name] = [sum(calls.values())]  # the count before the run
        return lambda done, ema: counts[name].append(sum(calls.values()))

    cfg = TeacherTrainConfig(steps=6, batch=8, batch_gpu=4, log_every=3, progress=False)
    train_teacher(_unet(), _image_samplers()[0], cfg, gens=_gens(), on_step=recorder("teacher"))
    vec = torch.randn(32, 4)

    def sample_real(n, gen):
        return vec[rng.randint(len(vec), (n,), gen)], None

    def sample_latents(n, gen):
        return rng.randn((n, 4), gen), None

    cfg = TrainConfig(steps=6, batch=8, batch_gpu=4, critic_ratio=2, log_every=3, progress=False)
    train_distill(
        _StubDistill(), sample_real, sample_latents, cfg, gens=_gens(), on_step=recorder("distill")
    )
    monkeypatch.undo()
    for name, seen in counts.items():
        per_step = [b - a for a, b in zip(seen, seen[1:], strict=False)]
        assert [s == 0 for s in per_step] == [True, True, False] * 2, (name, per_step)


# --------------------------------------------------------------------------- compile
def _vector_distill(**loss) -> FDistill:
    torch.manual_seed(0)
    teacher = EDMPrecond(MLP(4, hidden=32, depth=2), sigma_data=1.0)
    for p in teacher.parameters():
        nn.init.normal_(p, std=0.2)
    return _distill(teacher, **({"gan_weight": 1e-2} | loss))


def _compiled_run(backend: str | None, steps: int = 3, **loss):
    """Distil the MLP model; the losses logged and dynamo's graph count after every step."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = _vector_distill(**loss)
    vec = torch.randn(32, 4, generator=torch.Generator().manual_seed(2))
    graphs = []
    cfg = TrainConfig(steps=steps, batch=8, critic_ratio=2, progress=False)
    if backend:
        cfg = replace(cfg, compile=True, compile_backend=backend)
    train_distill(
        model,
        lambda n, g: (vec[rng.randint(len(vec), (n,), g)], None),
        lambda n, g: (rng.randn((n, 4), g), None),
        cfg,
        gens=_gens(),
        on_step=lambda d, e: graphs.append(counters["stats"]["unique_graphs"]),
    )
    return model, graphs


def _check_compiled(backend: str, atol: float) -> None:
    eager, _ = _compiled_run(None)
    # Past dynamo's recompile limit a network would silently run eagerly: make that an error.
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        compiled, graphs = _compiled_run(backend)
    assert graphs[0] > 0, "nothing was compiled"
    assert graphs[-1] == graphs[0], f"recompiled after the first step: {graphs}"
    for part in ("generator", "fake_score", "head"):
        d = _max_diff(getattr(compiled, part), getattr(eager, part))
        assert d < atol, (part, d)


def test_compiled_networks_match_eager_and_compile_once():
    """Dynamo + AOT autograd (no code generation, so it is quick): same training, and every
    graph is built in the first step (grad/no-grad, features, frozen weights)."""
    _check_compiled("aot_eager", atol=1e-5)


@pytest.mark.parametrize("disc", ["teacher", "fake"])
def test_compile_with_r1_keeps_the_feature_network_eager(disc):
    """R1 differentiates the discriminator's feature network twice; AOT autograd has no double
    backward, so that network must stay eager while the others compile."""
    eager, _ = _compiled_run(None, steps=2, r1_gamma=1.0, disc=disc)
    compiled, graphs = _compiled_run("aot_eager", steps=2, r1_gamma=1.0, disc=disc)
    assert graphs[-1] > 0
    for part in ("generator", "fake_score", "head"):
        assert _max_diff(getattr(compiled, part), getattr(eager, part)) < 1e-5, part


@pytest.mark.slow
def test_inductor_compiled_networks_match_eager():
    """The real code generator (C++ on a CPU): same training to float tolerance."""
    _check_compiled("inductor", atol=1e-4)


# --------------------------------------------------------------------------- benchmark
@pytest.mark.slow
def test_gpu_bench_runs_tiny_on_cpu(engine_updates, monkeypatch, capsys):
    """benchmarks/gpu_bench.py --tiny end to end on a CPU; every update it times or measures
    in this process is the engine's own (``Engine.update``, counted here); the compiled rows
    run the same code in a child process."""
    from fdistill.engine import Engine

    path = ROOT / "benchmarks" / "gpu_bench.py"
    spec = importlib.util.spec_from_file_location("bench_gpu_bench", path)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, mod)  # its dataclass looks itself up there
    spec.loader.exec_module(mod)
    calls = engine_updates
    held: list[int] = []  # gradients held when a memory measurement starts
    engines: list[Engine] = []
    init = Engine.__init__

    def tracked(self, *args, **kw):
        init(self, *args, **kw)
        engines.append(self)

    def peak(fn, device):  # CUDA's peak memory, run on the CPU: the update alone
        held.append(sum(p.grad is not None for e in engines for p in e.method.parameters()))
        fn()
        return float("nan"), float("nan")

    monkeypatch.setattr(Engine, "__init__", tracked)
    monkeypatch.setattr(mod, "peak", peak)
    threads = torch.get_num_threads()
    try:
        assert mod.main(["--tiny", "--threads", "1"]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    # 2 networks x (bf16, fp32) eager rows, each: a warm-up (1 teacher step, k = 5 critic
    # updates, 1 generator update), one timed round (2, k, 2) and one memory measurement of
    # each kind, from a state without gradients.
    assert calls == {
        ("Denoising", "denoise"): 4 * (1 + 2 + 1),
        ("FDistill", "critic"): 4 * (5 + 5 + 1),
        ("FDistill", "generator"): 4 * (1 + 2 + 1),
    }
    assert held == [0] * 4 * 3
    for net in ("cifar10-ddpm++", "imagenet64-adm"):
        for row in ("bf16 | eager", "fp32 | eager", "bf16 | aot_eager"):
            assert f"| {net} | {row} | 4 |" in out, (net, row, out)
        assert f"| {net} | bf16 | 4 |" in out  # sampling
    assert "failed" not in out and "timed out" not in out and "skipped" not in out, out


def test_unknown_compile_backend_is_a_one_line_error():
    cfg = TeacherTrainConfig(steps=1, batch=8, compile=True, compile_backend="nope", progress=False)
    with pytest.raises(ValueError, match="--compile-backend 'nope' is not a torch.compile backend"):
        train_teacher(_unet(), _image_samplers()[0], cfg, gens=_gens())
