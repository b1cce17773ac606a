"""Speed and scale: bf16 autocast, ``torch.compile`` of the networks, and how trained networks
are shared over processes (as they are, DDP, or FSDP2 shards)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import nn

from fdistill.engine.processes import Dist, average_gradients, full_tensor


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast runs on CPUs and on CUDA GPUs that support it."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def autocast(device: torch.device, bf16: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast of matrix products and convolutions where supported, else a no-op.

    Elementwise work (EDM preconditioning, noise, losses) stays float32 under autocast; the
    density ratio, ``h`` and the loss reductions cast to float32 explicitly (:mod:`fdistill.loss`).
    """
    device = torch.device(device)
    if bf16 and bf16_supported(device):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_supported(device: torch.device) -> bool:
    """``torch.compile`` of the networks runs on CPUs (needs a C++ compiler) and CUDA."""
    return torch.device(device).type in ("cpu", "cuda")


RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled function (its default, 8, is too few for distillation)."""


def compile_modules(
    modules: Iterable[nn.Module],
    device: torch.device,
    enabled: bool,
    backend: str = "inductor",
) -> None:
    """``torch.compile`` the modules in place (state-dict keys unchanged).

    Only the networks are compiled, not the Python logic of a training step. Every distinct
    way a network is called (grad or no-grad, ``return_features``, frozen weights) compiles
    once, on first use; later steps reuse the graphs. Networks of one class share dynamo's
    per-function cache (teacher, student and fake score are all ``EDMPrecond``: about a dozen
    graphs in a distillation), so its recompile limit is raised to :data:`RECOMPILE_LIMIT`;
    past the limit dynamo would silently run the network eagerly.
    """
    if enabled and compile_supported(device):
        import torch._dynamo

        conf = torch._dynamo.config
        conf.recompile_limit = max(conf.recompile_limit, RECOMPILE_LIMIT)
        for m in modules:
            m.compile(backend=backend)


def block_modules(module: nn.Module) -> list[nn.Module]:
    """The entries of every ``ModuleList``/``ModuleDict`` (a network's blocks), deepest first."""
    found = []
    for m in module.modules():
        if isinstance(m, nn.ModuleList | nn.ModuleDict):
            found += [c for c in m.children() if any(True for _ in c.parameters())]
    return found[::-1]


class Sharing:
    """How trained networks are shared over processes: as they are, DDP, or FSDP2 shards.

    * DDP (``world > 1``): a module's first update runs unwrapped and :meth:`reduce` averages
      its gradients in one flat all-reduce; parameters that got no gradient on any rank (EDM's
      ``map_augment`` when no augmentation labels are passed) are then told to DDP to ignore,
      and the module is wrapped in ``DistributedDataParallel``, which from then on all-reduces
      gradient buckets while the backward pass runs (``find_unused_parameters`` cannot be
      used: the critic calls the fake score twice per backward). A module called in an update
      that does not train it (the critic under ``frozen()`` in the generator update, the
      generator under ``no_grad`` in the critic update) runs inside :meth:`no_sync`, so DDP
      expects no gradients from it; so does every micro-batch but the last, so gradients
      accumulate locally and are reduced once.
    * FSDP (``fsdp`` and ``world > 1``): :meth:`prepare` shards a *copy* with ``fully_shard``
      (each block of the network, then the whole), gradients are reduce-scattered after every
      micro-batch (accumulating shards, not whole gradients), the optimiser holds shards.
      The caller's module keeps whole weights (and the EMA is whole); :meth:`finish` copies the
      trained weights back. Checkpoints hold whole state dicts (every rank gathers); the
      optimiser's name its parameters by path, so an FSDP run resumes with FSDP (at any number
      of processes). The frozen teacher is not sharded: weights only, no gradients or moments.
    """

    def __init__(self, ddp: Dist, fsdp: bool, compile_backend: str | None = None):
        self.ddp = ddp
        self.kind = "none" if ddp.world == 1 else "fsdp" if fsdp else "ddp"
        self.compile_backend = compile_backend
        self.pairs: list[tuple[nn.Module, nn.Module]] = []
        self.eager: set[int] = set()  # ids of modules never to compile

    def compile(self, modules: Iterable[nn.Module]) -> None:
        """Compile trained networks: now, or (DDP) when :meth:`reduce` wraps them, so dynamo
        sees the DDP wrapper and splits the graph at gradient buckets (``optimize_ddp``):
        a network compiled inside DDP would hand DDP all its gradients at once, at the end of
        its backward pass, and nothing would overlap."""
        if self.compile_backend is not None and self.kind != "ddp":
            compile_modules(modules, self.ddp.device, True, self.compile_backend)

    def prepare(self, module: nn.Module) -> nn.Module:
        """The module the loop calls and trains in place of ``module`` (DDP: see :meth:`reduce`)."""
        if self.kind != "fsdp":
            return module
        from torch.distributed.fsdp import fully_shard

        shard = copy.deepcopy(module)
        for block in block_modules(shard):
            fully_shard(block)
        fully_shard(shard)
        self.pairs.append((module, shard))
        return shard

    def reduce(self, modules: Sequence[nn.Module]) -> list[nn.Module]:
        """After the backward passes of an update that trains ``modules``: average the
        gradients DDP has not (a module's first update) and return the modules to call from
        now on (DDP wrappers where one was just made)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        if self.kind != "ddp":
            return list(modules)
        out = []
        for m in modules:
            if isinstance(m, DDP):
                out.append(m)
                continue
            named = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
            used = torch.tensor(
                [float(p.grad is not None) for _, p in named], device=self.ddp.device
            )
            dist.all_reduce(used, op=dist.ReduceOp.MAX)
            used_list = used.tolist()
            for (_, p), u in zip(named, used_list, strict=True):
                if u and p.grad is None:
                    p.grad = torch.zeros_like(p)
            average_gradients(
                [p for (_, p), u in zip(named, used_list, strict=True) if u], self.ddp.world
            )
            unused = [n for (n, _), u in zip(named, used_list, strict=True) if not u]
            DDP._set_params_and_buffers_to_ignore_for_model(m, unused)
            dev = self.ddp.device
            wrapped = DDP(
                m,
                device_ids=[dev.index] if dev.type == "cuda" else None,
                broadcast_buffers=False,  # buffers are constants: no collective per forward
            )
            if self.compile_backend is not None and id(m) not in self.eager:
                compile_modules([wrapped], dev, True, self.compile_backend)
            out.append(wrapped)
        return out

    @contextlib.contextmanager
    def no_sync(self, modules: Iterable[nn.Module]):
        """No gradient reduction for ``modules`` (DDP wrappers) in the forward and backward
        passes inside."""
        from torch.nn.parallel import DistributedDataParallel

        with contextlib.ExitStack() as stack:
            for m in modules:
                if isinstance(m, DistributedDataParallel):
                    stack.enter_context(m.no_sync())
            yield

    def state(self, original: nn.Module, trained: nn.Module) -> object:
        """What a checkpoint saves and restores for a trained module."""
        return FullModelState(trained) if self.kind == "fsdp" else original

    def optimizer_state(self, trained: Sequence[nn.Module], opt: torch.optim.Optimizer) -> object:
        if self.kind != "fsdp":
            return opt
        return FullOptimState(nn.ModuleList(trained), opt)

    def finish(self) -> None:
        """Copy the trained shards back into the callers' whole modules (collective)."""
        with torch.no_grad():
            for original, shard in self.pairs:
                for a, b in zip(original.parameters(), shard.parameters(), strict=True):
                    a.copy_(full_tensor(b))
                for a, b in zip(original.buffers(), shard.buffers(), strict=True):
                    a.copy_(full_tensor(b))


class FullModelState:
    """Checkpoint adapter of an FSDP-sharded module: whole (rank 0, CPU) state dicts."""

    def __init__(self, module: nn.Module):
        self.module = module

    def _options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, **kw)

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(self.module, options=self._options(cpu_offload=True))

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.module, sd, options=self._options())


class FullOptimState(FullModelState):
    """Checkpoint adapter of an optimiser over FSDP shards (parameters named by their path)."""

    def __init__(self, module: nn.Module, opt: torch.optim.Optimizer):
        super().__init__(module)
        self.opt = opt

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(
            self.module, self.opt, options=self._options(cpu_offload=True)
        )

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.module, self.opt, sd, options=self._options())
