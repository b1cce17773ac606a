"""Cost of an f-distill iteration against a teacher-training step of the same network.

DESIGN.md section 4: a distillation iteration (critic and generator updates in the configured
ratio, averaged per update) should cost at most 1.5x a teacher-training step (EDM loss,
forward + backward + optimiser) at the same batch; a generator update should peak at most
1.3x the memory of a teacher step; one-step sampling should be at least 30x faster than
35-NFE Heun. All are measured side by side in one process, on the same UNet and batch, with
the library's own update (:func:`fdistill.training.optimizer_step`: backward, gradient norm,
clipping, AdamW). Timings interleave the three kinds of update and report medians.

Memory: on CUDA ``torch.cuda.max_memory_allocated``; on a CPU the allocations the PyTorch
profiler records. "transient" is what an update allocates on top of the resident state
(activations, gradients, temporaries); "resident" is weights + AdamW state of what the update
keeps in memory (teacher step: one network; distillation: teacher, student, fake score, head).

    python benchmarks/step_cost.py                        # CPU, 32x32 RGB, batch 16
    python benchmarks/step_cost.py --device cuda --batch 128 --model-channels 128
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from fdistill.critic import MultiScaleHead
from fdistill.denoisers import EDMLoss, EDMPrecond, UNet
from fdistill.distill import FDistill, LossConfig
from fdistill.divergences import get_divergence
from fdistill.generator import OneStepGenerator
from fdistill.pipeline import DistillConfig
from fdistill.samplers import heun_sampler
from fdistill.training import optimizer_step


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, default=3, help="image channels")
    p.add_argument("--model-channels", type=int, default=32)
    p.add_argument("--channel-mult", default="1,2,2")
    p.add_argument("--num-blocks", type=int, default=1)
    p.add_argument("--attn", default="16", help="attention resolutions, comma separated")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--critic-ratio", type=int, default=5)
    p.add_argument("--disc-features", default="teacher,fake", help="teacher, fake or both")
    p.add_argument("--gan-weight", type=float, default=1e-3)
    p.add_argument("--rounds", type=int, default=6, help="timed rounds (after one warm-up)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action="store_true", help="autocast bfloat16 (CUDA)")
    return p.parse_args()


def _ints(text: str) -> list[int]:
    return [int(t) for t in text.split(",") if t.strip()]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of what ``fn`` allocates on top of what is allocated when it starts."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    allocs = sorted((e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]")
    cur = peak = 0
    for _, nbytes in allocs:
        cur += nbytes
        peak = max(peak, cur)
    return peak


def state_bytes(*modules: nn.Module, trained: tuple[nn.Module, ...] = ()) -> int:
    """Weights of ``modules`` plus AdamW's two moments for the ``trained`` ones."""
    size = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    return size + 2 * sum(p.numel() * p.element_size() for m in trained for p in m.parameters())


class Bench:
    """The network, data and teacher-training step shared by every measurement."""

    def __init__(self, args: argparse.Namespace):
        self.args, self.device = args, torch.device(args.device)
        torch.manual_seed(0)
        res, ch = args.resolution, args.channels
        net = UNet(
            res,
            ch,
            model_channels=args.model_channels,
            channel_mult=_ints(args.channel_mult),
            num_blocks=args.num_blocks,
            attn_resolutions=_ints(args.attn),
        )
        with torch.no_grad():  # a trained-looking network: no exactly-zero layers
            for p in net.parameters():
                p.add_(0.02 * torch.randn_like(p))
        self.teacher = EDMPrecond(net).to(self.device)
        self.gen = torch.Generator(device=self.device).manual_seed(0)
        self.shape = (args.batch, ch, res, res)
        self.x_real = torch.rand(self.shape, device=self.device, generator=self.gen) * 2 - 1
        # The teacher step trains its own copy of the network, so nothing is shared.
        self.tnet = copy.deepcopy(self.teacher).requires_grad_(True)
        self.t_params = list(self.tnet.parameters())
        self.t_opt = torch.optim.AdamW(self.t_params, lr=1e-4)
        self.edm = EDMLoss()

    def autocast(self):
        on = self.args.bf16 and self.device.type == "cuda"
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on)

    def latents(self) -> torch.Tensor:
        return torch.randn(self.shape, device=self.device, generator=self.gen)

    def teacher_step(self) -> None:
        with self.autocast():
            loss = self.edm(self.tnet, self.x_real, generator=self.gen).mean()
        optimizer_step(self.t_opt, self.t_params, loss, {}, step=1, grad_clip=10.0, world=1)

    def distill(self, feats: str) -> dict:
        """Timings (medians, seconds) and peak memory of teacher step, critic and generator."""
        args, dev, teacher = self.args, self.device, self.teacher
        model = FDistill(
            teacher,
            OneStepGenerator(copy.deepcopy(teacher).requires_grad_(True)),
            copy.deepcopy(teacher).requires_grad_(True),
            MultiScaleHead.for_network(teacher, hidden=DistillConfig().head_hidden),
            get_divergence("js"),
            LossConfig(gan_weight=args.gan_weight, disc_features=feats),
        ).to(dev)
        g_params, c_params = list(model.generator.parameters()), model.critic_parameters()
        opt_g = torch.optim.AdamW(g_params, lr=1e-4)
        opt_c = torch.optim.AdamW(c_params, lr=1e-4)

        def critic_update():
            with self.autocast():
                loss, st = model.critic_loss(self.latents(), None, self.x_real, None, self.gen)
            optimizer_step(opt_c, c_params, loss, st, step=1, grad_clip=10.0, world=1)

        def generator_update():
            with self.autocast():
                loss, st = model.generator_loss(self.latents(), None, self.gen)
            optimizer_step(opt_g, g_params, loss, st, step=1, grad_clip=10.0, world=1)

        k = args.critic_ratio
        times: dict[str, list[float]] = {"teacher": [], "critic": [], "generator": []}
        for r in range(args.rounds + 1):  # round 0 warms up (allocator, AdamW state)
            t = {"teacher": timed(self.teacher_step, dev)}
            t["critic"] = statistics.mean(timed(critic_update, dev) for _ in range(k))
            t["generator"] = timed(generator_update, dev)
            for name, v in t.items():
                times[name] += [v] if r else []
        med = {name: statistics.median(v) for name, v in times.items()}

        for opt in (self.t_opt, opt_c, opt_g):  # measure from a state without gradients
            opt.zero_grad(set_to_none=True)
        mem = {"teacher": peak_bytes(self.teacher_step, dev)}
        mem["critic"] = peak_bytes(critic_update, dev)
        mem["generator"] = peak_bytes(generator_update, dev)
        self.t_opt.zero_grad(set_to_none=True)
        trained = (model.generator, model.fake_score, model.head)
        return {
            "time": med,
            "per_update": (k * med["critic"] + med["generator"]) / (k + 1),
            "mem": mem,
            "resident_teacher": state_bytes(self.tnet, trained=(self.tnet,)),
            "resident_distill": state_bytes(model.teacher, *trained, trained=trained),
        }

    def sampling(self) -> tuple[float, float]:
        """Median seconds of one student step and of 35-NFE Heun (18 steps), interleaved."""
        student, dev = OneStepGenerator(self.teacher), self.device
        z = self.latents()
        one, heun = [], []
        with torch.no_grad():
            for _ in range(3):
                one += [timed(lambda: student(z), dev) for _ in range(4)]
                heun.append(timed(lambda: heun_sampler(self.teacher, z, num_steps=18), dev))
        return statistics.median(one[1:]), statistics.median(heun[1:])

    def forward_costs(self) -> tuple[float, float]:
        """Median seconds of a no-grad full forward and of a feature-only one."""
        unet, dev, x = self.teacher.net, self.device, self.x_real
        c_noise = torch.full((len(x),), 0.1, device=dev)
        full, enc = [], []
        with torch.no_grad():
            for _ in range(self.args.rounds + 1):
                full.append(timed(lambda: unet(x, c_noise), dev))
                enc.append(timed(lambda: unet(x, c_noise, return_features="only"), dev))
        return statistics.median(full[1:]), statistics.median(enc[1:])


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    n_params = sum(p.numel() for p in bench.teacher.parameters())
    print(
        f"UNet {args.resolution}x{args.resolution}x{args.channels}, {n_params / 1e6:.2f} M "
        f"parameters, batch {args.batch}, critic ratio {args.critic_ratio}, GAN weight "
        f"{args.gan_weight}, device {bench.device}, threads {args.threads}"
        + (", bf16" if args.bf16 else "")
    )
    feats = [f.strip() for f in args.disc_features.split(",") if f.strip()]
    rows = {f: bench.distill(f) for f in feats}
    t_one, t_heun = bench.sampling()
    f_full, f_enc = bench.forward_costs()

    print(
        "\n| disc features | teacher step | critic update | generator update | per update "
        "(ratio avg) | per update / teacher | critic / teacher | generator / teacher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        t, tt = r["time"], r["time"]["teacher"]
        print(
            f"| {f} | {tt * 1e3:.1f} ms | {t['critic'] * 1e3:.1f} ms | "
            f"{t['generator'] * 1e3:.1f} ms | {r['per_update'] * 1e3:.1f} ms | "
            f"**{r['per_update'] / tt:.2f}x** (target <= 1.5) | {t['critic'] / tt:.2f}x | "
            f"{t['generator'] / tt:.2f}x |"
        )
    frac = f_enc / f_full
    print(
        f"\nforward (no grad) F = {f_full * 1e3:.1f} ms; feature-only (input -> bottleneck, what "
        f"the discriminator passes run) {f_enc * 1e3:.1f} ms ({frac:.0%})."
    )
    for f, r in rows.items():
        t, k = r["time"], args.critic_ratio
        critic_floor = f_full + t["teacher"]  # generator forward + a denoising step of the fake
        gen_floor = 2 * f_full + t["teacher"] + (f_enc if args.gan_weight > 0 else 0)
        per_floor = (k * critic_floor + gen_floor) / (k + 1)
        print(
            f"{f}: floor of this schedule (critic: generator forward + fake-score step; "
            f"generator: its own step + teacher and fake-score forwards) = "
            f"{per_floor / t['teacher']:.2f}x a teacher step per update; measured "
            f"{r['per_update'] / t['teacher']:.2f}x"
        )
    mib = 2**20
    print(
        "\n| disc features | transient: teacher step | critic update | generator update | "
        "generator / teacher | resident: teacher training | distillation | "
        "total (resident + transient): generator / teacher |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for f, r in rows.items():
        m, rt, rd = r["mem"], r["resident_teacher"], r["resident_distill"]
        print(
            f"| {f} | {m['teacher'] / mib:.1f} MiB | {m['critic'] / mib:.1f} MiB | "
            f"{m['generator'] / mib:.1f} MiB | **{m['generator'] / m['teacher']:.2f}x** "
            f"(target <= 1.3) | {rt / mib:.1f} MiB | {rd / mib:.1f} MiB | "
            f"{(m['generator'] + rd) / (m['teacher'] + rt):.2f}x |"
        )
    print(
        f"\nsampling, batch {args.batch}: one step {t_one * 1e3:.2f} ms, 35-NFE Heun "
        f"{t_heun * 1e3:.1f} ms -> **{t_heun / t_one:.1f}x** faster (target >= 30, limit 35)"
    )


if __name__ == "__main__":
    main()
