"""Optional test-time adaptation: a few fine-tuning steps on the user's own examples.

Leave-one-out episodes: one example is the query, the others (augmented) are the context; with a
single example it plays both roles under different augmentations. The model is copied, never
changed in place, so a shared cached model stays as shipped. Off by default: naive fine-tuning on
three slices overfits (see the training issue's calibration), so its gain is measured before use.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from monai.transforms import Compose, RandAffined, RandFlipd, RandScaleIntensityd

from medgen.core.errors import Cancelled
from medgen.nn.model import InContextUNet

AUGMENT = Compose([
    RandFlipd(["image", "target"], prob=0.5, spatial_axis=1),
    RandAffined(["image", "target"], prob=0.8, rotate_range=0.2, scale_range=0.1,
                translate_range=8, mode=("bilinear", "nearest"), padding_mode="zeros"),
    RandScaleIntensityd("image", factors=0.1, prob=0.5),
])


def adapt(model: InContextUNet, images: np.ndarray, targets: np.ndarray, task: int, modality: int,
          steps: int = 0, seconds: float = 0.0, lr: float = 1e-4, seed: int = 0,
          cancel=None, context: int = 4, window: int = 0) -> InContextUNet:
    """Fine-tune a copy on grid-sized example pairs [L, k, S, S] (L runs, e.g. one per label).

    Returns the copy in eval mode; each step draws one run, one left-out example of it and up to
    `context` of the others as its pairs, so a step costs the same with 4 examples or 16 and
    every example is still learnt from over the steps. Pairs larger than `window` (a whole image
    sampled finely for thin structures) are cut to a window around a random foreground pixel,
    at the scale the run sees them, as training's cross-subject episodes are.
    """
    if steps <= 0 and seconds <= 0:
        return model
    torch.manual_seed(seed)
    AUGMENT.set_random_state(seed)
    tuned = copy.deepcopy(model).train()
    device = next(tuned.parameters()).device
    opt = torch.optim.AdamW(tuned.parameters(), lr=lr)
    dice = DiceLoss(sigmoid=True)
    runs, k, start, step = images.shape[0], images.shape[1], time.time(), 0
    rng = np.random.default_rng(seed)
    while (steps <= 0 or step < steps) and (seconds <= 0 or time.time() - start < seconds):
        if cancel is not None and cancel():
            raise Cancelled("cancelled by the user during adaptation; nothing was written")
        run, q = int(rng.integers(runs)), int(rng.integers(k))
        others = [i for i in range(k) if i != q]
        ctx = [int(i) for i in rng.permutation(others)[:context]] or [q]
        pairs = [AUGMENT(_cut(images[run, i], targets[run, i], window, rng)) for i in ctx + [q]]
        t = lambda key, sel: torch.stack([torch.as_tensor(np.asarray(p[key])) for p in sel]).float().to(device)
        ci, ct = t("image", pairs[:-1])[None], t("target", pairs[:-1])[None]
        qi, qt = t("image", pairs[-1:]), t("target", pairs[-1:])
        ids = torch.tensor([task], device=device), torch.tensor([modality], device=device)
        out = tuned(ci, ct, qi, *ids)
        loss = (dice(out["seg"], qt) + F.binary_cross_entropy_with_logits(out["seg"], qt)
                if task == 0 else F.l1_loss(out["image"], qt))
        opt.zero_grad()
        loss.backward()
        opt.step()
        step += 1
    return tuned.eval()


def _cut(image: np.ndarray, target: np.ndarray, window: int, rng: np.random.Generator) -> dict:
    """A window x window piece around a random foreground pixel (jittered), or the whole pair."""
    side = image.shape[-1]
    if not window or side <= window:
        return {"image": image[None], "target": target[None]}
    fg = np.argwhere(target > 0.5)
    centre = fg[int(rng.integers(len(fg)))] if len(fg) else np.array(image.shape) // 2
    r0, c0 = np.clip(centre + rng.integers(-window // 3, window // 3 + 1, 2) - window // 2, 0,
                     np.array(image.shape) - window).astype(int)
    box = (slice(r0, r0 + window), slice(c0, c0 + window))
    return {"image": image[box][None], "target": target[box][None]}
