"""Classical answers that need no model: the self-check's candidates and the bench's baselines.

One copy of each method, used by the run's self-check (`selfcheck.py`, which may pick one of them
over the model for a structure or task) and by `medgen bench` (whose baselines import them from
here), so the method the runtime chooses is the very method the benchmark scored. Every method is
library code (SimpleITK, scikit-image, ITK through `interpolate.py`); this module only feeds it.
SimpleITK and scikit-image are imported inside the functions: importing this module stays cheap
(`medgen run --help` loads neither).

Propagation methods take slices-first arrays (slice axis 0) and labelled slice indices.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

NLM_FACTORS = (0.4, 0.6, 0.8, 1.0, 1.2)  # NL-means h in units of the noise sigma
TV_WEIGHTS = (0.02, 0.05, 0.1, 0.2)  # total-variation weights (normalised intensities)


# -- propagation -----------------------------------------------------------------------------------
def nearest_copy(labels: np.ndarray, given: list[int]) -> np.ndarray:
    """Every slice (axis 0) takes the labels of the nearest labelled slice in `given`."""
    idx = np.asarray(given)
    nearest = idx[np.argmin(np.abs(np.arange(labels.shape[0])[:, None] - idx[None]), axis=1)]
    return labels[nearest]


class FieldCache(dict):
    """Demons displacement fields by (box, fixed slice, moving slice), within a byte budget.

    A field depends on the two images only, not on the mask carried: the self-check's folds
    register the very slice pairs the run's own registration needs again (a fold's chain from a
    labelled slice to the hidden one is the run's chain, one slice longer), so with this cache the
    run reuses them instead of paying for them twice."""

    def __init__(self, budget_bytes: int = 512 << 20) -> None:
        super().__init__()
        self.room = budget_bytes
        self._lock = threading.Lock()  # the self-check's folds keep fields from several threads

    def keep(self, key: tuple, transform, nbytes: int) -> None:
        with self._lock:
            if nbytes <= self.room and key not in self:
                self[key] = transform
                self.room -= nbytes


def registration_propagate(slices: np.ndarray, given: dict[int, np.ndarray],
                           spacing: tuple[float, float], iterations: int = 40,
                           parts: tuple[str, ...] = ("between", "beyond"),
                           stop_at: int | None = None, box: tuple[slice, slice] | None = None,
                           fields: FieldCache | None = None, offset: int = 0,
                           reach: int | None = None, tissue_stop: bool = False,
                           max_side: int | None = None, refine: int = 0) -> np.ndarray:
    """Slice-to-slice deformable registration (SimpleITK fast symmetric forces demons) carries each
    labelled slice's mask outward, slice by slice; between two labelled slices both directions run
    and are blended linearly by distance. Open ends stop when the carried mask vanishes.
    (Inverting the first direction's fields for the second, instead of registering each pair both
    ways, was tried on 2026-12-03: the 200 x 256^2 user run's auto 28.4 -> 23.2 s, but auto lost
    0.003-0.014 Dice on the bench's rows that chose registration, CT spleen k = 3 0.926 -> 0.914:
    the blend averages two independent estimates, and an inverted field is not one.)
    Registration runs on a box around the labels with a margin (whole 512^2 CT slices would only
    add background to match). `slices` should be normalised (the demons force assumes it).
    `parts` limits the work to the chains between the labelled slices and/or beyond them (the
    self-check may use registration for one of the two only). `stop_at`: only that slice's answer
    is wanted (the self-check's hidden slice): chains stop there, which gives the same answer at
    that slice for half the registrations. `box`: the registration window (default: around
    `given`); `fields`: a cache shared between calls on the same volume (see FieldCache), where
    `slices` starts at slice `offset` of that volume. `reach`: open ends stop after that many
    slices (the runtime's stop rule; the bench's baseline, as users run it, has none).
    `tissue_stop`: an open end also stops where the carried mask's median intensity leaves the
    5-95th percentile range of the structure on its labelled slice: demons keeps a mask alive
    past the structure's end (it always finds something to match), but the tissue under the
    mask then changes (a lung lesion's end leaves the mask over air). `max_side`: the field is
    estimated on a grid shrunk by a whole factor until the window's long side fits (and applied at
    full resolution, as `carry` does): on the bench's 300 x 512^2 MR a whole-slice window took
    0.84 s a slice pair at full resolution and 0.22 s at half, for the same Dice over one gap
    (0.862 / 0.861). `refine` > 0: a two-level pyramid, the usual way to run demons: `iterations`
    on a grid twice as coarse again, then `refine` iterations on the window's grid from that field
    (see `_field`)."""
    n = slices.shape[0]
    box = box or label_box(list(given.values()), slices.shape[1:])
    fields = FieldCache(0) if fields is None else fields
    crops = slices[:, box[0], box[1]].astype(np.float32)
    shrink = 1 if max_side is None else max(1, int(np.ceil(max(crops.shape[1:]) / max_side)))
    acc = np.zeros(crops.shape, np.float32)
    wsum = np.zeros(n, np.float32)
    idx = sorted(given)
    demons = _demons(iterations)
    window = (box[0].start, box[0].stop, box[1].start, box[1].stop)
    for origin, step, end, span in _chains(idx, n):
        if ("beyond" if span is None else "between") not in parts:
            continue
        if stop_at is not None and not min(origin, end) < stop_at < max(origin, end):
            continue
        keys = {s: window + (offset + s, offset + s - step, shrink, iterations, refine)
                for s in range(origin + step, end, step)}
        known = _known_steps(origin, step, end, span, stop_at, reach)
        prefetched = _fields_side_by_side([(keys[s], s, s - step) for s in known], crops, spacing, shrink,
                                          iterations, fields, refine)
        mask = given[origin][box[0], box[1]].astype(np.float32)
        band = tissue_band(crops[origin], mask) if tissue_stop and span is None else None
        for s in range(origin + step, end, step):
            transform = prefetched.get(keys[s])
            if transform is None:
                transform = _field(demons, crops[s], crops[s - step], spacing, shrink, fields, keys[s], refine)
            mask = (_carry_mask(transform, crops[s], mask, spacing) >= 0.5).astype(np.float32)
            if band is not None and not in_band(crops[s], mask > 0.5, band):
                break  # the tissue under the carried mask is no longer the structure's
            w = 1.0 if span is None else max(1e-3, 1 - abs(s - origin) / span)
            acc[s] += w * mask
            wsum[s] += w
            if span is None and (mask.max() < 0.5 or reach is not None and abs(s - origin) >= reach) \
                    or s == stop_at:
                break
    out = np.zeros(slices.shape, bool)
    out[:, box[0], box[1]] = acc / np.maximum(wsum, 1e-6)[:, None, None] >= 0.5
    for s, m in given.items():
        out[s] = m > 0
    return out


def tissue_band(image: np.ndarray, mask: np.ndarray) -> tuple[float, float] | None:
    """The 5-95th percentile intensity of the structure on a labelled slice (None if empty)."""
    inside = image[mask > 0.5]
    return tuple(np.percentile(inside, (5, 95))) if inside.size else None


def in_band(image: np.ndarray, mask: np.ndarray, band: tuple[float, float]) -> bool:
    """Whether the median intensity under `mask` lies in the structure's band (an empty mask
    does: the empty-slice rule handles it). Past a structure's end propagation keeps carrying
    something over whatever lies there (demons always finds a match; the model did too, bench
    lung2 k = 5: a lesion mask over air, median -700 HU against the lesion's -250 to 70, for
    three slices); the tissue under the mask tells."""
    return not mask.any() or band[0] <= float(np.median(image[mask])) <= band[1]


def carry(fixed: np.ndarray, moving: np.ndarray, mask: np.ndarray, iterations: int = 20,
          shrink: int = 2, threads: int | None = 1) -> np.ndarray:
    """`mask` (a probability map on `moving`) carried onto `fixed` by demons registration of the
    two images, for propagation's prior: the prior needs the structure's shift and bend from one
    slice to the next, not its detail, so the field is estimated at 1/`shrink` resolution (a
    quarter of the pixels) and applied at full resolution. Same-size 2D arrays, unit spacing.
    20 iterations: the bench's propagation rows moved by at most 0.006 Dice against 40, for half
    the time. `threads`: ITK's threads (None: its default, all cores)."""
    import SimpleITK as sitk

    f, m = sitk2d(fixed, (1.0, 1.0)), sitk2d(moving, (1.0, 1.0))
    shrinker, resample = sitk.BinShrinkImageFilter(), sitk.ResampleImageFilter()
    if threads is not None:
        shrinker.SetNumberOfThreads(threads)
        resample.SetNumberOfThreads(threads)
    demons = _demons(iterations, threads)
    shrinker.SetShrinkFactors([shrink] * 2)
    field = demons.Execute(shrinker.Execute(f), shrinker.Execute(m))
    resample.SetReferenceImage(f)
    resample.SetTransform(sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64)))
    return sitk.GetArrayFromImage(resample.Execute(sitk2d(mask, (1.0, 1.0))))


MOSAIC_GAP = 16  # pixels between tiles: 5 field-smoothing sigmas at the shrunk resolution


def carry_all(jobs: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """`carry` for each (fixed, moving, mask) of one size, as one registration of a mosaic of the
    pairs, tiles MOSAIC_GAP apart (the field's smoothing does not reach across the gap). On images
    this small ITK's demons pays a fixed cost per iteration (about 1 ms at 64^2 on the shrunk grid)
    besides its per-pixel work; one mosaic pays it once and uses every core: 9 ms a pair against
    13 ms for single carries side by side on a thread pool (30 pairs, 2 cores); in a 128 x 256^2
    propagation run with 8 labelled slices the carries took 2.1 s instead of 3.0 s. Each tile
    agrees with its own single carry (tested on real CT slices)."""
    if len(jobs) < 2 or len({part.shape for job in jobs for part in job}) > 1:
        return [carry(*j) for j in jobs]
    h, w = jobs[0][0].shape
    ph, pw = h + MOSAIC_GAP, w + MOSAIC_GAP
    cols = int(np.ceil(np.sqrt(len(jobs))))
    rows = -(-len(jobs) // cols)
    mosaics = [np.zeros((rows * ph, cols * pw), np.float32) for _ in range(3)]
    places = [(i // cols * ph, i % cols * pw) for i in range(len(jobs))]
    for (r, c), job in zip(places, jobs):
        for mosaic, part in zip(mosaics, job):
            mosaic[r:r + h, c:c + w] = part
    out = carry(*mosaics, threads=None)
    return [out[r:r + h, c:c + w] for r, c in places]


def _chains(idx: list[int], n: int) -> list[tuple[int, int, int, int | None]]:
    """(origin, step, end exclusive, span for blending or None for an open end)."""
    chains = [(idx[0], -1, -1, None), (idx[-1], 1, n, None)]
    for a, b in zip(idx[:-1], idx[1:]):
        chains += [(a, 1, b, b - a), (b, -1, a, b - a)]
    return chains


def label_box(masks: list[np.ndarray], shape: tuple[int, int], margin: float = 0.5,
              pad: int = 16) -> tuple[slice, slice]:
    """The registration window: the masks' union box, widened by `margin` of its size + `pad`."""
    union = np.any(np.stack(masks), axis=0)
    out = []
    for ax in (0, 1):
        idx = np.nonzero(union.any(1 - ax))[0]
        extra = int((idx[-1] - idx[0] + 1) * margin) + pad
        out.append(slice(max(int(idx[0]) - extra, 0), min(int(idx[-1]) + 1 + extra, shape[ax])))
    return out[0], out[1]


def _known_steps(origin: int, step: int, end: int, span: int | None, stop_at: int | None,
                 reach: int | None) -> list[int]:
    """The slices a chain will surely visit unless its mask vanishes first: all of a chain between
    two labelled slices, an open end up to `stop_at` or `reach` (none for an unbounded open end,
    whose length only its mask tells)."""
    bounds = [end - step]
    if stop_at is not None:
        bounds.append(stop_at)
    if span is None and reach is not None:
        bounds.append(origin + step * reach)
    elif span is None and stop_at is None:
        return []
    last = min(bounds) if step > 0 else max(bounds)
    return list(range(origin + step, last + step, step))


def _demons(iterations: int, threads: int | None = None):
    """SimpleITK fast symmetric forces demons, field smoothed with sigma 1.5 pixels."""
    import SimpleITK as sitk

    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(iterations)
    demons.SetStandardDeviations(1.5)
    if threads is not None:
        demons.SetNumberOfThreads(threads)
    return demons


def _field(demons, fixed: np.ndarray, moving: np.ndarray, spacing: tuple[float, float], shrink: int = 1,
           fields: FieldCache | None = None, key: tuple | None = None, refine: int = 0):
    """The displacement field registering `moving` (the previous slice) onto `fixed`, from the cache
    when it is there (and kept in it when there is room). `refine` > 0: `demons` runs on the pair
    shrunk twice as far again, and its field, resampled to the pair's grid, starts `refine`
    iterations there. SimpleITK's demons filters take an initial field but build no pyramid
    themselves (its multi-resolution framework is for ImageRegistrationMethod's parametric
    transforms), hence these few lines. In the self-check's folds and run (20 + 5 iterations)
    on the 22 structures the bench does not score, auto's mean Dice went from 0.745 to 0.756 and
    the 200 x 256^2 user run's warm engine from 26.7 to 19.0 s."""
    import SimpleITK as sitk

    transform = None if fields is None else fields.get(key)
    if transform is None:
        pair = (sitk2d(fixed, spacing), sitk2d(moving, spacing))
        if shrink > 1:  # the field on a coarser grid; the resample in _carry_mask stays at full resolution
            pair = tuple(sitk.BinShrink(image, [shrink] * 2) for image in pair)
        if refine > 0:
            coarse = demons.Execute(*(sitk.BinShrink(image, [2, 2]) for image in pair))
            start = sitk.Resample(coarse, pair[0], sitk.Transform(), sitk.sitkLinear, 0.0, coarse.GetPixelID())
            field = _demons(refine, demons.GetNumberOfThreads()).Execute(*pair, start)
        else:
            field = demons.Execute(*pair)
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        if fields is not None:
            fields.keep(key, transform, 16 * fixed.size)
    return transform


def _fields_side_by_side(jobs: list[tuple[tuple, int, int]], crops: np.ndarray, spacing: tuple[float, float],
                         shrink: int, iterations: int, fields: FieldCache, refine: int = 0) -> dict:
    """The fields of a chain's slice pairs (key, fixed index, moving index), computed side by side,
    one single-threaded demons per core. A field depends on its two images only, so a chain's
    fields need not wait for the mask it carries. ITK's own threads did not pay on these windows
    (2 cores, 100^2 pixels, 40 iterations: 63 ms a pair with both cores, 57 ms with one) while two
    registrations side by side took 28 ms a pair; the fields are the same (each tile is one
    registration, as before). One chain at a time bounds the memory to one gap's fields."""
    import torch

    todo = [job for job in jobs if job[0] not in fields]
    workers = min(len(todo), torch.get_num_threads())
    if workers < 2:
        return {}
    from concurrent.futures import ThreadPoolExecutor

    def one(job: tuple[tuple, int, int]):
        key, s, m = job
        return key, _field(_demons(iterations, threads=1), crops[s], crops[m], spacing, shrink, refine=refine)
    with ThreadPoolExecutor(workers) as pool:
        out = dict(pool.map(one, todo))
    for key, transform in out.items():
        fields.keep(key, transform, 16 * crops[0].size)
    return out


def _carry_mask(transform, fixed: np.ndarray, mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """`mask` (on the moving slice) resampled onto `fixed`'s grid through the field."""
    import SimpleITK as sitk

    f, lab = sitk2d(fixed, spacing), sitk2d(mask, spacing)
    return sitk.GetArrayFromImage(sitk.Resample(lab, f, transform, sitk.sitkLinear, 0.0))


def sitk2d(array: np.ndarray, spacing: tuple[float, float]):
    """A 2D SimpleITK image of a numpy slice (rows, cols) with its pixel spacing."""
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.SetSpacing((float(spacing[1]), float(spacing[0])))
    return image


# -- pixel classification (slice-by-slice segmentation) -----------------------------------------------
# ilastik's pixel classification, as scikit-image's trainable segmentation builds it: multiscale
# intensity, edge and texture features (Gaussian scales 1-16 pixels) per pixel, a random forest
# fitted on the example pairs. It reads nothing but the examples, so it follows them by construction
# where the network may recognise the domain instead (bench, ambiguity test, 2026-12-04: it followed
# the examples on 57 of 60 queries, the model on 53; Dice 0.93 / 0.84 on MNI grey / white matter
# against the model's 0.71 / 0.55, but 0.42 against 0.70 on the aseg nuclei, which intensity cannot
# tell apart): the self-check picks between the two per label (slicewise.py).
PIXEL_SIGMAS = (1.0, 16.0)
PIXEL_TREES, PIXEL_DEPTH = 50, 12
PIXEL_BACKGROUND = 20000  # background pixels sampled per fit (at least four per structure pixel)
# structure pixels kept per fit: 16 example slices of a liver hold some 450 000, a forest on all of
# them (and four times as much background) would take minutes; the bench's ambiguity cases hold at
# most 22 000. Even so a fit on 8 BUSI pairs (25 000 + 100 000 pixels) takes tens of seconds on
# one core, once per hidden pair in the self-check (README, "Slice by slice")
PIXEL_STRUCTURE = 25000


def pixel_features(image: np.ndarray) -> np.ndarray:
    """[H, W, F] float32 features of a normalised slice."""
    from skimage.feature import multiscale_basic_features

    return multiscale_basic_features(image.astype(np.float32), sigma_min=PIXEL_SIGMAS[0],
                                     sigma_max=PIXEL_SIGMAS[1]).astype(np.float32)


def fit_pixel_classifier(features: list[np.ndarray], masks: list[np.ndarray], seed: int = 0, threads: int = 1):
    """A random forest on the examples' structure pixels (up to PIXEL_STRUCTURE) and a sample of the
    rest (class weights balanced: a small structure must not vanish under its background)."""
    from sklearn.ensemble import RandomForestClassifier

    x = np.concatenate([f.reshape(-1, f.shape[-1]) for f in features])
    y = np.concatenate([m.reshape(-1) for m in masks]).astype(np.uint8)
    pos, neg = np.flatnonzero(y), np.flatnonzero(y == 0)
    rng = np.random.default_rng(seed)
    if len(pos) > PIXEL_STRUCTURE:
        pos = rng.choice(pos, PIXEL_STRUCTURE, replace=False)
    keep = np.concatenate([pos, rng.choice(neg, min(len(neg), max(4 * len(pos), PIXEL_BACKGROUND)), replace=False)])
    forest = RandomForestClassifier(n_estimators=PIXEL_TREES, max_depth=PIXEL_DEPTH, class_weight="balanced",
                                    random_state=seed, n_jobs=threads)
    return forest.fit(x[keep], y[keep])


def predict_pixels(forest, features: np.ndarray) -> np.ndarray:
    """The structure's mask on one slice's features (probability above one half)."""
    if len(forest.classes_) < 2:  # the examples showed one class only
        return np.full(features.shape[:2], bool(forest.classes_[0]))
    prob = forest.predict_proba(features.reshape(-1, features.shape[-1]))[:, 1]
    return prob.reshape(features.shape[:2]) > 0.5


# -- denoising ---------------------------------------------------------------------------------------
def nl_means(noisy: np.ndarray, h: float, sigma: float) -> np.ndarray:
    """scikit-image non-local means (fast mode, 5x5 patches, 13x13 search) on a normalised slice."""
    from skimage.restoration import denoise_nl_means

    return denoise_nl_means(noisy, h=h * sigma, sigma=sigma, patch_size=5, patch_distance=6,
                            fast_mode=True, preserve_range=True)


def noise_sigma(noisy: list[np.ndarray], clean: list[np.ndarray]) -> float:
    """The noise level the example pairs show (std of noisy - clean): what NL-means needs to know."""
    return float(np.std(np.concatenate([(x - y).ravel() for x, y in zip(noisy, clean)])))


def tv(noisy: np.ndarray, weight: float) -> np.ndarray:
    """scikit-image total-variation (Chambolle) denoising on a normalised slice."""
    from skimage.restoration import denoise_tv_chambolle

    return denoise_tv_chambolle(noisy, weight=weight)


def pick_parameter(fn: Callable[[np.ndarray, float], np.ndarray], grid, noisy: list[np.ndarray],
                   clean: list[np.ndarray]) -> float:
    """The grid value with the lowest error on the example pairs (the model's context)."""
    err = [np.mean([np.mean((fn(x, p) - y) ** 2) for x, y in zip(noisy, clean)]) for p in grid]
    return float(grid[int(np.argmin(err))])


# -- inpainting and synthesis ------------------------------------------------------------------------
def biharmonic(image: np.ndarray, hole: np.ndarray, pad: int = 12) -> np.ndarray:
    """scikit-image biharmonic inpainting, solved on a box around the hole: a fraction of the whole
    slice's sparse solve, and not the same answer (the far boundary no longer pulls on the fill;
    on the bench's AURORA hole 12.34 dB against the whole slice's 12.24)."""
    from skimage.restoration import inpaint_biharmonic

    rows, cols = np.nonzero(hole.any(1))[0], np.nonzero(hole.any(0))[0]
    if rows.size == 0:
        return image.astype(np.float32).copy()
    r = slice(max(rows[0] - pad, 0), min(rows[-1] + 1 + pad, image.shape[0]))
    c = slice(max(cols[0] - pad, 0), min(cols[-1] + 1 + pad, image.shape[1]))
    out = image.astype(np.float32).copy()
    out[r, c] = inpaint_biharmonic(out[r, c], hole[r, c])
    return out


def histogram_match(source: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """scikit-image histogram matching of the input contrast's values to the example targets'."""
    from skimage.exposure import match_histograms

    return match_histograms(source, reference)


def linear_map(x_examples: np.ndarray, y_examples: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Least-squares line from input to target intensities, fitted on the example pairs."""
    a, b = np.polyfit(x_examples.astype(np.float64), y_examples.astype(np.float64), 1)
    return (a * x + b).astype(np.float32)
