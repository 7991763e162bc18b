"""The in-context network: a conv U-Net whose query meets every context pair, mean over pairs.

Family: UniverSeg / Neuralizer. The difference that matters for a 3D Slicer user is cost: UniverSeg
lets every support pair see the query through a 3x3 cross-convolution, so nothing can be cached
and every extra example costs a full network pass (~10 GFLOPs). Here the context pairs go through
the encoder once per run (`encode_context`) and are kept in a `ContextCache`; a query slice then
pays one encoder + decoder pass plus, per pair and level, an add, an activation and a mean
(pixel-wise interaction) and one cross-attention over the pairs' bottleneck tokens. The order of
pairs never matters: every reduction over pairs is a mean or an attention over the union of
their tokens.

Inputs to the shared encoder are four channels: image, auxiliary target, where the auxiliary
target is valid, and role (1 for a context pair, 0 for the query). For a context pair the
auxiliary target is its target; for the query it is an optional prior (a neighbour's prediction,
an interpolated label, the known pixels around an inpainting hole), so that one mechanism serves
masked-target training, autoregressive propagation and prior correction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from monai.networks.blocks import UnetBasicBlock, UnetUpBlock
from torch import nn

from medgen.core.config import MODALITIES, TASKS, ModelConfig

NORM = ("group", {"num_groups": 4})
ACT = ("leakyrelu", {"negative_slope": 0.1, "inplace": True})


@dataclass
class ContextCache:
    """Everything the query needs from the context pairs, computed once per run.

    Shapes: B runs in a batch (e.g. one per label), k pairs.
    levels[l]: [B, k, C_l, h_l, w_l] context features already projected for the interaction;
    tokens: [B, k * h * w, C] bottleneck tokens for cross-attention; pooled: [B, k, C] per-pair
    descriptors (their mean conditions the decoder); task, modality: [B] long.
    """

    levels: dict[int, torch.Tensor]
    tokens: torch.Tensor
    pooled: torch.Tensor
    task: torch.Tensor
    modality: torch.Tensor

    @property
    def k(self) -> int:
        return self.pooled.shape[1]

    def cat(self, other: "ContextCache") -> "ContextCache":
        """Union of two pair sets for the same runs (used to add short-term memory pairs)."""
        levels = {l: torch.cat([v, other.levels[l]], 1) for l, v in self.levels.items()}
        return ContextCache(levels, torch.cat([self.tokens, other.tokens], 1),
                            torch.cat([self.pooled, other.pooled], 1), self.task, self.modality)

    def index(self, idx: torch.Tensor | list[int]) -> "ContextCache":
        """Select runs along the batch axis (e.g. map propagation chains to their label)."""
        idx = torch.as_tensor(idx, device=self.pooled.device, dtype=torch.long)
        return ContextCache({l: v[idx] for l, v in self.levels.items()}, self.tokens[idx],
                            self.pooled[idx], self.task[idx], self.modality[idx])


class FiLM(nn.Module):
    """Feature-wise scale and shift from a conditioning vector (task, modality, context)."""

    def __init__(self, embed_dim: int, channels: int) -> None:
        super().__init__()
        self.proj = nn.Linear(embed_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=1)
        return x * (1 + gamma[..., None, None]) + beta[..., None, None]


class PairInteraction(nn.Module):
    """q + W_o mean_i act(W_q q + W_c c_i): the pixel-wise query/pair meeting of Neuralizer.

    W_c c_i does not depend on the query, so it is computed in `project_context` and cached;
    per query and pair only an add and an activation remain.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.w_q = nn.Conv2d(channels, channels, 1)
        self.w_c = nn.Conv2d(channels, channels, 1, bias=False)
        self.w_o = nn.Conv2d(channels, channels, 1)

    def project_context(self, ctx: torch.Tensor) -> torch.Tensor:
        b, k = ctx.shape[:2]
        return self.w_c(ctx.flatten(0, 1)).unflatten(0, (b, k))

    def forward(self, q: torch.Tensor, ctx_proj: torch.Tensor) -> torch.Tensor:
        if ctx_proj.shape[-2:] != q.shape[-2:]:
            b, k = ctx_proj.shape[:2]
            ctx_proj = F.interpolate(ctx_proj.flatten(0, 1), size=q.shape[-2:], mode="bilinear",
                                     align_corners=False).unflatten(0, (b, k))
        mixed = F.leaky_relu(self.w_q(q).unsqueeze(1) + ctx_proj, 0.1).mean(1)
        return q + self.w_o(mixed)


class InContextUNet(nn.Module):
    """One network for all tasks: context pairs + query (+ optional prior) -> query's target."""

    def __init__(self, config: ModelConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = config or ModelConfig()
        ch, d = cfg.channels, cfg.embed_dim
        self.task_embed = nn.Embedding(len(TASKS), d)
        self.modality_embed = nn.Embedding(len(MODALITIES), d)
        self.encoder = nn.ModuleList(
            UnetBasicBlock(2, 4 if i == 0 else ch[i - 1], c, 3, 1 if i == 0 else 2, NORM, ACT)
            for i, c in enumerate(ch))
        self.enc_film = nn.ModuleList(FiLM(d, c) for c in ch)
        self.pool_proj = nn.Linear(ch[-1], d)
        self.attn_norm_q = nn.LayerNorm(ch[-1])
        self.attn_norm_c = nn.LayerNorm(ch[-1])
        self.attention = nn.MultiheadAttention(ch[-1], cfg.heads, batch_first=True)
        self.interact = nn.ModuleDict({str(l): PairInteraction(ch[l]) for l in cfg.interaction_levels})
        self.decoder = nn.ModuleList(
            UnetUpBlock(2, ch[i + 1], ch[i], 3, 2, 2, NORM, ACT) for i in range(len(ch) - 1))
        self.dec_film = nn.ModuleList(FiLM(d, c) for c in ch[:-1])
        self.seg_head = nn.Conv2d(ch[0], 1, 1)
        self.image_head = nn.Conv2d(ch[0] + 1, 1, 1)
        nn.init.zeros_(self.image_head.weight)
        nn.init.zeros_(self.image_head.bias)

    # -- shared encoder ---------------------------------------------------------------------
    def _encode(self, x: torch.Tensor, cond: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for block, film in zip(self.encoder, self.enc_film):
            x = film(block(x), cond)
            feats.append(x)
        return feats

    def _prior_cond(self, task: torch.Tensor, modality: torch.Tensor) -> torch.Tensor:
        return self.task_embed(task) + self.modality_embed(modality)

    def encode_context(self, images: torch.Tensor, targets: torch.Tensor, task: torch.Tensor,
                       modality: torch.Tensor) -> ContextCache:
        """Encode k pairs per run once. images, targets: [B, k, 1, H, W]; task, modality: [B]."""
        b, k = images.shape[:2]
        x = torch.cat([images, targets, torch.ones_like(images), torch.ones_like(images)], 2)
        cond = self._prior_cond(task, modality).repeat_interleave(k, 0)
        feats = self._encode(x.flatten(0, 1), cond)
        levels = {l: self.interact[str(l)].project_context(feats[l].unflatten(0, (b, k)))
                  for l in self.config.interaction_levels}
        bottom = feats[-1].unflatten(0, (b, k))  # [B, k, C, h, w]
        tokens = self.attn_norm_c(bottom.permute(0, 1, 3, 4, 2).reshape(b, -1, bottom.shape[2]))
        pooled = bottom.mean((-2, -1))
        return ContextCache(levels, tokens, pooled, task, modality)

    def predict(self, query: torch.Tensor, cache: ContextCache, prior: torch.Tensor | None = None,
                prior_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Predict the query's target. query, prior, prior_valid: [B, 1, H, W].

        Returns 'seg' (logits) and 'image' (normalised intensities); the caller picks the head
        that fits its task.
        """
        if prior is None:
            prior = torch.zeros_like(query)
            prior_valid = torch.zeros_like(query)
        elif prior_valid is None:
            prior_valid = torch.ones_like(query)
        x = torch.cat([query, prior * prior_valid, prior_valid, torch.zeros_like(query)], 1)
        cond = self._prior_cond(cache.task, cache.modality)
        feats = self._encode(x, cond)
        bottom = feats[-1]
        b, c, h, w = bottom.shape
        tokens = self.attn_norm_q(bottom.flatten(2).transpose(1, 2))
        attended = self.attention(tokens, cache.tokens, cache.tokens, need_weights=False)[0]
        bottom = bottom + attended.transpose(1, 2).reshape(b, c, h, w)
        cond = cond + self.pool_proj(cache.pooled.mean(1))
        top = len(feats) - 1
        if top in cache.levels:
            bottom = self.interact[str(top)](bottom, cache.levels[top])
        y = bottom
        for level in range(top - 1, -1, -1):
            y = self.dec_film[level](self.decoder[level](y, feats[level]), cond)
            if level in cache.levels:
                y = self.interact[str(level)](y, cache.levels[level])
        # image tasks predict a correction of the query: denoising and inpainting start from the
        # identity (the noisy input is the baseline to beat), synthesis learns the contrast change
        return {"seg": self.seg_head(y), "image": query + self.image_head(torch.cat([y, query], 1))}

    def forward(self, ctx_images: torch.Tensor, ctx_targets: torch.Tensor, query: torch.Tensor,
                task: torch.Tensor, modality: torch.Tensor, prior: torch.Tensor | None = None,
                prior_valid: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Training entry: encode the pairs and predict in one call."""
        cache = self.encode_context(ctx_images, ctx_targets, task, modality)
        return self.predict(query, cache, prior, prior_valid)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
