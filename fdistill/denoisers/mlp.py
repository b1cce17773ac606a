"""A small residual MLP for vector data (2-D toys, flattened tiny images)."""

from __future__ import annotations

from torch import Tensor, nn

from fdistill.denoisers.base import FeatureMap, Features, FeatureTaps, after_taps
from fdistill.denoisers.unet import FourierEmbedding


class MLP(FeatureTaps, nn.Module):
    """Raw network ``net(x, c_noise, cond, return_features)`` for vectors ``x`` of shape [N, D].

    Wrap it in :class:`~fdistill.denoisers.EDMPrecond` to get a denoiser. Its one feature tap,
    ``hidden``, is the last hidden activation [N, hidden]; ``return_features=True`` gives
    ``(out, [hidden])``, ``"only"`` gives ``[hidden]`` without the output layer and
    ``"encoder_grad"`` runs the output layer without a graph.
    """

    def __init__(
        self, dim: int, hidden: int = 128, depth: int = 3, num_classes: int = 0, emb: int = 64
    ):
        super().__init__()
        self.dim, self.hidden, self.num_classes = dim, hidden, num_classes
        self.embed_noise = FourierEmbedding(emb)
        self.embed_class = nn.Embedding(num_classes, emb) if num_classes else None
        self.emb_proj = nn.Sequential(nn.Linear(emb, hidden), nn.SiLU())
        self.inp = nn.Linear(dim, hidden)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden)
            )
            for _ in range(depth)
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, dim))

    def feature_maps(self) -> list[FeatureMap]:
        return [FeatureMap("hidden", self.hidden, 0)]

    def forward(
        self,
        x: Tensor,
        c_noise: Tensor,
        cond: Tensor | None = None,
        return_features: Features = False,
    ):
        e = self.embed_noise(c_noise)
        if self.embed_class is not None and cond is not None:
            e = e + self.embed_class(cond.long())
        e = self.emb_proj(e)
        h = self.inp(x.reshape(x.shape[0], -1))
        for block in self.blocks:
            h = h + block(h + e)
        if return_features == "only":
            return [h]
        with after_taps(return_features):
            out = self.out(h).reshape(x.shape)
        return (out, [h]) if return_features else out
