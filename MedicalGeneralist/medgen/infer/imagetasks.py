"""Denoising, inpainting and synthesis of a volume, slice by slice at native resolution.

Image tasks must not lose detail, so slices are never resized: the model (fully convolutional,
trained on grid-sized native-resolution crops) runs over each slice with MONAI's Gaussian-weighted
sliding window at its training grid size. Context pairs are grid-sized native crops too, encoded
once. Outputs are mapped back to the input's units (or, for synthesis, the example targets' units).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from monai.inferers import sliding_window_inference

from medgen.core.config import ModelConfig, task_index
from medgen.prompts import Example
from medgen.core.grid import Box, crop
from medgen.core.intensity import Normalizer
from medgen.infer.predictor import Predictor

Progress = Callable[[float, str], None]


def _window(e: Example, size: int) -> Box:
    """A grid-sized window at the example's point of interest (default: the slice centre)."""
    r, c = e.center or (e.image.shape[0] // 2, e.image.shape[1] // 2)
    return Box(r - size // 2, r - size // 2 + size, c - size // 2, c - size // 2 + size)


def classical_fill(x: np.ndarray, holes: np.ndarray) -> np.ndarray:
    """Biharmonic fill of each slice's hole (scikit-image, on a box around the hole as the bench's
    baseline): the model corrects it, not a blank, so its residual output starts from the answer
    users already have. The whole-slice solve it replaced was 0.1 dB worse on the bench's hole."""
    from medgen.infer.classical import biharmonic

    return np.stack([biharmonic(s, h) for s, h in zip(x, holes)]).astype(np.float32, copy=False)


NLM_PATCH, NLM_DISTANCE = 5, 5  # patch 5x5, search 11x11: see classical_denoise


def classical_denoise(x: np.ndarray) -> np.ndarray:
    """The denoising query's starting point: scikit-image non-local means per slice, its
    strength from the slice's own noise estimate (h = 0.8 sigma, the setting `medgen bench`
    found best). The model's residual output corrects the classical result users already have.

    The search window is 11x11 (patch_distance 5), not 13x13: 40 % less time for the same model
    output (python -m medgen_dev.bench.denoise_start, the model's PSNR on the bench's denoising
    cases: lung2 CT 39.29 -> 39.23 dB; a 9x9 window lost 0.15 dB there)."""
    from skimage.restoration import denoise_nl_means, estimate_sigma

    def one(slice_: np.ndarray) -> np.ndarray:
        sigma = float(estimate_sigma(slice_))
        if sigma <= 0:
            return slice_.astype(np.float32)
        return denoise_nl_means(slice_, h=0.8 * sigma, sigma=sigma, fast_mode=True,
                                patch_size=NLM_PATCH, patch_distance=NLM_DISTANCE).astype(np.float32)

    return _per_slice(one, x)


def example_denoise(ctx_noisy: np.ndarray, ctx_clean: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The denoising start of models trained with `denoise_inputs = "tuned-nlm+noisy"`: NL-means with the
    noise level the example pairs show and the strength (h) that fits them best, as the bench's
    NL-means baseline is tuned. The examples say how noisy the data is more surely than one slice's
    own estimate does (the bench: 34.90 against 33.87 dB on AURORA T1 at 5 %). The strength is
    fitted on at most four pairs (ctx arrays are [k, S, S] normalised grids; 20 grid-sized NL-means
    runs, a fifth of a second); the search window is the per-slice start's (see classical_denoise)."""
    from skimage.restoration import denoise_nl_means

    from medgen.infer.classical import NLM_FACTORS, noise_sigma, pick_parameter

    sigma = max(noise_sigma(list(ctx_noisy), list(ctx_clean)), 1e-6)
    nlm = lambda s, f: denoise_nl_means(s, h=f * sigma, sigma=sigma, fast_mode=True, patch_size=NLM_PATCH,
                                        patch_distance=NLM_DISTANCE, preserve_range=True).astype(np.float32)
    h = pick_parameter(nlm, NLM_FACTORS, list(ctx_noisy[:4]), list(ctx_clean[:4]))
    return lambda x: _per_slice(lambda s: nlm(s, h), x)


def _per_slice(fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray) -> np.ndarray:
    """fn over the slices of x [n, H, W] on a thread pool: scikit-image's NL-means loop releases
    the GIL, so every core is used."""
    from concurrent.futures import ThreadPoolExecutor

    workers = max(1, min(torch.get_num_threads(), x.shape[0]))
    with ThreadPoolExecutor(workers) as pool:
        return np.stack(list(pool.map(fn, x))).astype(np.float32, copy=False)


def linear_start(ctx_x: np.ndarray, ctx_y: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """The synthesis query's starting point: a least-squares linear intensity map fitted once on
    the example pairs' foreground (numpy.polyfit), returned as a function to apply to queries;
    background takes the examples' mean background. As with inpainting, the model's residual
    output corrects the baseline users already have instead of starting from the wrong contrast."""
    fg = ctx_x > 0.02
    if fg.sum() < 10:
        return lambda x: x
    a, b = np.polyfit(ctx_x[fg].astype(np.float64), ctx_y[fg].astype(np.float64), 1)
    bg = float(ctx_y[~fg].mean()) if (~fg).any() else 0.0
    return lambda x: np.where(x > 0.02, a * x + b, bg).astype(np.float32)


def example_grids(examples: list[Example], size: int) -> tuple[np.ndarray, np.ndarray]:
    """Normalised grid-sized native crops of the pairs ([k, S, S] each), as the model sees them."""
    imgs = np.stack([crop(e.image_norm(e.image), _window(e, size)) for e in examples])
    tgts = np.stack([crop(e.target_norm(e.target), _window(e, size)) for e in examples])
    return imgs, tgts


def encode_examples(p: Predictor, examples: list[Example], task: int, modality: int):
    imgs, tgts = example_grids(examples, p.model.config.grid)
    return p.encode(imgs[None], tgts[None], task, modality)


def _start(examples: list[Example], task: int, config: ModelConfig) -> Callable[[np.ndarray], np.ndarray]:
    """Where the query starts (normalised units): the classical answer the model corrects, for
    denoising the one its config says it was trained with (ModelConfig.denoise_inputs)."""
    if task == task_index("synthesize"):
        return linear_start(*(np.concatenate([a.ravel() for a in arrays]) for arrays in zip(
            *[(e.image_norm(e.image), e.target_norm(e.target)) for e in examples])))
    if task == task_index("denoise"):
        if config.denoise_inputs.startswith("tuned-nlm"):
            return example_denoise(*example_grids(examples, config.grid))
        return classical_denoise
    return lambda x: x  # inpainting: the biharmonic start needs the holes (channels below)


def _channels(x: np.ndarray, holes: np.ndarray | None, task: int, config: ModelConfig,
              start: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """The model's input channels [n, C, H, W] for normalised slices x: query (its start), prior, valid."""
    if holes is not None:
        valid = (~holes).astype(np.float32)
        channels = [classical_fill(x, holes), x * valid, valid]
    elif task == task_index("denoise") and config.denoise_inputs == "tuned-nlm+noisy":
        channels = [start(x), x, np.ones_like(x)]  # the noisy slice beside its start
    else:
        channels = [start(x)]
    return np.stack(channels, 1)


def _scored(x: np.ndarray, y: np.ndarray, task: int) -> np.ndarray:
    """Voxels off the background, as the bench scores them; for denoising those of the clean target
    only (noise lifts the noisy input's background, where the model's gain is of no use)."""
    return y > y.min() if task == task_index("denoise") else (x > x.min()) | (y > y.min())


MAX_STRENGTH_FOLDS = 4  # hidden pairs, spread over the examples: each costs one context encoding


def correction_strength(p: Predictor, examples: list[Example], task: int, modality: int,
                        start: Callable[[np.ndarray], np.ndarray] | None = None) -> float | None:
    """How much of the model's correction to its classical start the examples say to keep (0..1).

    The network edits a strong classical start (NL-means, biharmonic fill, a linear map); on some
    data its edit helps, on other data it takes detail off (the bench: -1.5 dB in tissue on AURORA
    T1 at 5 % noise). The example pairs are ground truth the user gave, so each is hidden in turn,
    the model runs on it from the others, and one least-squares factor a on the pairs' scored voxels
    (tissue, or the hole) sets output = start + a (model - start). None (keep all) with one pair.
    At most MAX_STRENGTH_FOLDS pairs are hidden, and a denoising `start` fitted on all pairs is reused
    (its noise level and strength then know the hidden pair, as the self-check's tuned baselines do):
    refitting it per fold was most of the cost, a fixed one the bench's slab timing multiplies.
    """
    if len(examples) < 2:
        return None
    config, size = p.model.config, p.model.config.grid
    imgs, tgts = example_grids(examples, size)
    num = den = 0.0
    folds = sorted({int(round(v)) for v in np.linspace(0, len(examples) - 1, min(len(examples), MAX_STRENGTH_FOLDS))})
    for j in folds:
        rest = [e for i, e in enumerate(examples) if i != j]
        fold_start = start if start is not None and task == task_index("denoise") else _start(rest, task, config)
        holes = None
        if task == task_index("inpaint"):
            hole = (examples[j].image != examples[j].target).astype(np.float32)
            holes = crop(hole, _window(examples[j], size))[None] > 0.5
        x = _channels(imgs[j][None], holes, task, config, fold_start)
        with torch.inference_mode():
            y = p.predict_tensor(torch.as_tensor(x, device=p.device), encode_examples(p, rest, task, modality),
                                 "image")[0, 0].cpu().numpy()
        s, t = x[0, 0], tgts[j]
        region = holes[0] if holes is not None else _scored(imgs[j], t, task)
        d = (y - s)[region]
        num, den = num + float(d @ (t - s)[region]), den + float(d @ d)
    return float(np.clip(num / den, 0.0, 1.0)) if den > 0 else 1.0


def run_image_task(p: Predictor, slices: np.ndarray, examples: list[Example], task: int,
                   modality: int, in_norm: Normalizer, out_norm: Normalizer,
                   holes: np.ndarray | None, progress: Progress, batch: int = 4) -> tuple[np.ndarray, float | None]:
    """slices: [n, H, W] input units; holes: [n, H, W] bool for inpainting. Returns the output (output
    units) and the correction strength the examples gave (None with one pair: all of it kept)."""
    start = _start(examples, task, p.model.config)
    strength = correction_strength(p, examples, task, modality, start)
    cache = encode_examples(p, examples, task, modality)
    size = p.model.config.grid
    n = slices.shape[0]
    out = np.empty(slices.shape, np.float32)
    todo = [i for i in range(n) if holes is None or holes[i].any()]
    for i in set(range(n)) - set(todo):
        out[i] = slices[i]
    for j in range(0, len(todo), batch):
        idx = todo[j:j + batch]
        x = _channels(in_norm(slices[idx]), None if holes is None else holes[idx], task, p.model.config, start)
        inputs = torch.as_tensor(x, device=p.device)
        with torch.inference_mode():
            y = sliding_window_inference(inputs, (size, size), 8,
                                         lambda w: p.predict_tensor(w, cache, "image"),
                                         overlap=0.25, mode="gaussian")
        y = y[:, 0].cpu().numpy()
        if strength is not None:
            y = x[:, 0] + strength * (y - x[:, 0])
        y = out_norm.inverse(y)
        if holes is not None:
            y = np.where(holes[idx], y, slices[idx])
        out[idx] = y
        progress((j + len(idx)) / max(len(todo), 1), f"slice {idx[-1] + 1}/{n}")
    return out, strength
