"""`medgen bench`: the model against the tools users already have, on real data, as one command.

Four sections, each scored the same way for the model and every baseline:
1. in-volume propagation: k labelled slices of a 3D structure -> the rest (Dice, HD95);
2. cross-subject 2D: k example pairs from other subjects -> each query (Dice);
3. denoising, inpainting, synthesis (PSNR, SSIM);
4. speed and memory, with a UniverSeg-sized reference through the same harness (bench_speed).
Every figure goes to results.json and the Markdown report (bench_report); every row says whether
the model saw that data in training. Labels made by algorithms are scored as agreement with them.
Nothing here is tuned on the scored material: baselines' parameters are picked on the examples.
"""

from __future__ import annotations

import argparse
import time
import warnings
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np

from medgen_dev.bench import baselines as bl
from medgen_dev.bench.report import CONTEXT_ONLY
from medgen_dev.bench.data import (DEFAULT_CONFIG, REPO_ROOT, BenchConfig, ImageCase, PairSet, Structure,
                         add_noise, config_from_folder, crop_around, even_slices, load_config,
                         load_structure, mask_on_image, spread_slices)
from medgen.metrics import image_scores, seg_scores
from medgen.prompts import inpaint_self_examples, pairs_from_volumes
from medgen.io.images import read_volume
from medgen.core.intensity import fit_normalizer
from medgen.core.volume import Volume, parse_axis

# torch and the engine (pipeline) are imported inside the functions that run the model, so that
# cli.py can build its parser from add_bench_arguments without paying for them on every command.

Log = Callable[[str], None]
SECTIONS = ("propagation", "cross_subject", "in_context", "image_tasks", "speed")


# -- command line -----------------------------------------------------------------------------------
def main(argv: list[str]) -> int:
    """`medgen bench ARGS` (cli.py hands the arguments over without importing this module)."""
    parser = argparse.ArgumentParser(prog="medgen bench", description="accuracy against users' "
                                     "baselines, speed and memory (docs/BENCHMARKS.md)")
    add_bench_arguments(parser)
    return bench_command(parser.parse_args(argv))


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `medgen bench`."""
    parser.add_argument("--quick", action="store_true",
                        help="the CI subset: a few structures, slices and sizes (minutes, not an hour)")
    parser.add_argument("--config", default=None,
                        help=f"benchmark configuration JSON (default: {DEFAULT_CONFIG.relative_to(REPO_ROOT)})")
    parser.add_argument("--data", default=None,
                        help="benchmark a folder in the layout of docs/BENCHMARKS.md instead of --config")
    parser.add_argument("--out", default=None,
                        help="output folder for BENCHMARKS.md and bench/ (default: the repository's docs/; "
                             "with --quick: ./medgen-bench-quick, so the committed report is never overwritten)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    parser.add_argument("--model", default=None, help="model id, local path or hf://org/repo@revision")
    parser.add_argument("--sections", default=",".join(SECTIONS),
                        help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--volumes", default=None,
                        help="speed section volume sizes z x y x x, comma-separated (overrides the configuration)")
    parser.add_argument("--card", default=None, metavar="MODEL_CARD.md",
                        help="also write the summary tables into this model card (between bench markers)")
    parser.add_argument("--ablation", action="append", default=[], metavar="NAME=MODEL",
                        help="with --card: score this model on the same accuracy sections for the card's "
                             "ablation table (repeatable)")


def bench_command(args: argparse.Namespace) -> int:
    """Run the benchmark the arguments describe and write the report; 0 on success."""
    from medgen_dev.bench.report import write_report

    cfg = config_from_folder(args.data, args.quick) if args.data else load_config(args.config, args.quick)
    if args.volumes:
        cfg.speed.sizes = [tuple(int(v) for v in s.split("x")) for s in args.volumes.split(",")]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        from medgen.core.errors import InputError
        raise InputError(f"unknown --sections {', '.join(sorted(unknown))}: use {', '.join(SECTIONS)}")
    out = Path(args.out) if args.out else (Path("medgen-bench-quick") if args.quick else REPO_ROOT / "docs")
    ablations = dict(_ablation(a) for a in args.ablation)
    results, pictures = run_bench(cfg, args.model, args.device, sections, quick=args.quick)
    report = write_report(results, pictures, out)
    print(f"medgen bench: wrote {report} and {out / 'bench'} in {results['meta']['seconds']:.0f} s")
    if args.card:
        from medgen_dev.bench.report import write_card_tables

        accuracy = [s for s in sections if s != "speed"]
        others = {name: run_bench(cfg, spec, args.device, accuracy, quick=args.quick)[0]
                  for name, spec in ablations.items()}
        print(f"medgen bench: wrote the tables into {write_card_tables(Path(args.card), results, others)}")
    return 0


def _ablation(text: str) -> tuple[str, str]:
    name, sep, spec = text.partition("=")
    if not sep or not name or not spec:
        from medgen.core.errors import InputError
        raise InputError(f"--ablation {text!r}: write NAME=MODEL, e.g. no-pseudotasks=runs/ablation1")
    return name, spec


def run_bench(cfg: BenchConfig, model_spec: str | None = None, device: str = "auto",
              sections: list[str] | tuple[str, ...] = SECTIONS, quick: bool = False,
              log: Log = print) -> tuple[dict, dict]:
    """All asked sections: (results for JSON, arrays for the montages)."""
    from medgen_dev.bench.report import environment
    from medgen.io.weights import load_model

    warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")  # MONAI 1.5+ internal
    start = time.perf_counter()
    model, info = load_model(model_spec, device="cpu")
    results: dict = {"meta": environment(info, cfg, quick, device)}
    pictures: dict = {}
    steps = {"propagation": lambda: propagation(model, cfg, device, log),
             "cross_subject": lambda: cross_subject(model, cfg, device, log),
             "in_context": lambda: (in_context(model, cfg, device, log, quick), {}),
             "image_tasks": lambda: image_tasks(model, cfg, device, log),
             "speed": lambda: (speed(model, cfg, device, model_spec, log), {})}
    for name in SECTIONS:
        if name in sections:
            t = time.perf_counter()
            log(f"== {name}")
            results[name], pictures[name] = steps[name]()
            results[name]["seconds"] = time.perf_counter() - t
    results["meta"]["seconds"] = time.perf_counter() - start
    return results, pictures


# -- 1. in-volume propagation ------------------------------------------------------------------------
def propagation(model, cfg: BenchConfig, device: str, log: Log) -> tuple[dict, dict]:
    rows, pictures = [], {}
    for s in cfg.structures:
        image, label, axis = load_structure(s)
        if cfg.crop:
            image, label = crop_around(image, label, axis)
        present = np.nonzero(np.moveaxis(label.array, axis, 0).any((1, 2)))[0]
        for k in cfg.propagation_k:
            if k >= len(present):
                rows.append(_skipped(s, k, f"the structure spans {len(present)} slices: k={k} leaves none to score"))
                continue
            rng = np.random.default_rng([cfg.seed, k])
            given = spread_slices(present, k, rng)
            row, pic = _propagate_one(model, s, image, label, axis, given, device)
            rows.append(row)
            pictures[(s.name, k)] = pic
            log(f"{s.name} k={k}: " + ", ".join(f"{m} {v['dice']:.3f}" for m, v in row["methods"].items()))
    return {"rows": rows}, pictures


def _skipped(s: Structure, k: int, why: str) -> dict:
    return {"structure": s.name, "k": k, "skipped": why, "seen": s.seen}


def _propagate_one(model, s: Structure, image: Volume, label: Volume, axis: int, given: list[int],
                   device: str) -> tuple[dict, dict]:
    """The model and the three baselines from the same labelled slices, scored on the rest."""
    from medgen.infer.pipeline import RunOptions, run

    truth = np.moveaxis(label.array, axis, 0) > 0
    slices = np.moveaxis(image.array, axis, 0)
    spacing = (tuple(reversed(image.spacing))[axis],) + image.slice_spacing(axis)
    t = time.perf_counter()
    examples = pairs_from_volumes(image, label, axis, given, "segment", s.modality, own=True)
    ours = np.moveaxis(run(model, image, examples, RunOptions("segment", axis, s.modality, device,
                                                              method="model")).array, axis, 0) > 0
    seconds = time.perf_counter() - t
    auto, check = _auto(model, image, examples, RunOptions("segment", axis, s.modality, device))
    norm = fit_normalizer(image.array, s.modality, clip=True)
    preds = {"ours": ours, "auto": np.moveaxis(auto, axis, 0) > 0,
             bl.PROPAGATION_BASELINES[0]: bl.copy_nearest(truth, given),
             bl.PROPAGATION_BASELINES[1]: bl.fill_between_slices(truth, given),
             bl.PROPAGATION_BASELINES[2]: bl.registration_propagate(
                 norm(slices), {g: truth[g] for g in given}, image.slice_spacing(axis))}
    rest = np.setdiff1d(np.arange(truth.shape[0]), given)
    between = rest[(rest > given[0]) & (rest < given[-1])]
    methods = {}
    for name, pred in preds.items():
        methods[name] = seg_scores(pred[rest], truth[rest], spacing)
        if len(between):
            methods[name]["dice_between"] = seg_scores(pred[between], truth[between], with_hd95=False)["dice"]
    row = {"structure": s.name, "k": len(given), "given": given, "seen": s.seen, "modality": s.modality,
           "labels_by": s.labels_by, "shape": list(image.shape), "axis": axis, "scored_slices": len(rest),
           "slices_between": len(between), "seconds_ours": seconds, "methods": methods, "auto": check}
    if len(given) == 1:  # the k = 1 rule's competitor: registration stopped as auto stops it
        forced = run(model, image, examples, RunOptions("segment", axis, s.modality, device, method="registration"))
        row["one_slice_registration"] = seg_scores((np.moveaxis(forced.array, axis, 0) > 0)[rest], truth[rest],
                                                   with_hd95=False)["dice"]
    return row, _showcase(slices, truth, preds, rest)


def _model_and_auto(model, image: Volume, examples: list, options,
                    mask: Volume | None = None) -> tuple[Volume, np.ndarray, dict]:
    """Image tasks: the model alone (timed into the check) and the run as users get it (auto)."""
    from medgen.infer.pipeline import run

    auto, check = _auto(model, image, examples, options, mask=mask)
    t = time.perf_counter()
    ours = run(model, image, examples, replace(options, method="model"), mask=mask)
    check["seconds_ours"] = time.perf_counter() - t
    return ours, auto, check


def _auto(model, image: Volume, examples: list, options, mask: Volume | None = None) -> tuple[np.ndarray, dict]:
    """The run as users get it by default (method auto): its output and its self-check, timed."""
    from medgen.infer.pipeline import run_with_report

    t = time.perf_counter()
    result = run_with_report(model, image, examples, options, mask=mask)
    report = result.report.to_dict()
    first = report["estimates"][0]
    return result.volume.array, {"chosen": first["chosen"], "estimate": first["estimate"],
                                 "loo": first.get("leave_one_out", first["estimate"]),
                                 "candidates": first["candidates"], "note": first["note"],
                                 "seconds": time.perf_counter() - t,
                                 "check_seconds": report["check_seconds"], "run_seconds": report["run_seconds"]}


def _showcase(slices: np.ndarray, truth: np.ndarray, preds: dict, rest: np.ndarray) -> dict:
    """The scored slice with the most structure, cropped around it, for the montages."""
    s = int(rest[np.argmax(truth[rest].sum((1, 2)))])
    union = truth[s] | np.any([p[s] for p in preds.values()], axis=0)
    rows, cols = np.nonzero(union.any(1))[0], np.nonzero(union.any(0))[0]
    side = max(rows[-1] - rows[0], cols[-1] - cols[0], 24) * 0.8
    rc, cc = (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2
    r = slice(max(int(rc - side), 0), int(rc + side) + 1)
    c = slice(max(int(cc - side), 0), int(cc + side) + 1)
    return {"slice": s, "image": slices[s][r, c].astype(np.float32), "truth": truth[s][r, c],
            "preds": {m: p[s][r, c] for m, p in preds.items()}}


# -- 2. cross-subject 2D -----------------------------------------------------------------------------
def cross_subject(model, cfg: BenchConfig, device: str, log: Log) -> tuple[dict, dict]:
    rows, pictures = [], {}
    ks = sorted(cfg.cross_k)
    for ps in cfg.pair_sets:
        cache: dict[Path, tuple[Volume, np.ndarray]] = {}
        load = lambda pair: cache.setdefault(pair[0], _load_pair(pair))
        for qi, query in enumerate(ps.queries[:cfg.queries_per_set]):
            pool = [p for p in ps.pool if p[0] != query[0]] if ps.leave_one_out else list(ps.pool)
            order = np.random.default_rng([cfg.seed, qi]).permutation(len(pool))[:ks[-1]]
            examples = [load(pool[int(i)]) for i in order]
            row, pic = _cross_one(model, ps, load(query), examples, ks, device, cfg.seed)
            row.update(query=str(query[0].name), index=qi)
            rows.append(row)
            pictures[(ps.name, qi)] = pic
            log(f"{ps.name} query {qi}: " + ", ".join(
                f"k={k} ours {row['methods']['ours'][str(k)]:.3f}" for k in ks if str(k) in row["methods"]["ours"]))
    return {"rows": rows, "k": ks}, pictures


def _load_pair(pair: tuple[Path, Path]) -> tuple[Volume, np.ndarray]:
    image = read_volume(pair[0])
    return image, read_volume(pair[1], label=True).array > 0


def _cross_one(model, ps: PairSet, query: tuple[Volume, np.ndarray], examples: list,
               ks: list[int], device: str, seed: int) -> tuple[dict, dict]:
    """Dice of the model, the mean-mask prior and multi-atlas voting for every k on one query."""
    from medgen.infer.pipeline import RunOptions, run

    image, truth = query
    q2d = image.array[0].astype(np.float32)
    warped = [bl.atlas_register(q2d, e[0].array[0], e[1][0], seed) for e in examples]
    methods: dict[str, dict[str, float]] = {m: {} for m in ("ours", CONTEXT_ONLY, *bl.CROSS_BASELINES)}
    preds = {}
    for k in ks:
        if k > len(examples):
            continue
        ex = []
        for img, msk in examples[:k]:
            ex += pairs_from_volumes(img, img.with_array(msk.astype(np.uint8)), 0, None, "segment",
                                     ps.modality, own=False)
        ours, context = (run(model, image, ex, RunOptions("segment", 0, ps.modality, device, method="model",
                                                          adapt_steps=steps)).array[0] > 0 for steps in (None, 0))
        preds[k] = {"ours": ours, CONTEXT_ONLY: context, bl.CROSS_BASELINES[0]: bl.mean_of_masks([m[0] for _, m in examples[:k]], q2d.shape),
                    bl.CROSS_BASELINES[1]: bl.majority_vote(warped[:k])}
        for name, pred in preds[k].items():
            methods[name][str(k)] = seg_scores(pred, truth[0], with_hd95=False)["dice"]
    top = max(preds)
    row = {"set": ps.name, "seen_queries": ps.seen_queries, "seen_examples": ps.seen_pool,
           "modality": ps.modality, "labels_by": ps.labels_by, "methods": methods}
    return row, {"image": q2d, "truth": truth[0], "preds": preds[top], "k": top}


# -- 2b. in-context use: ambiguity and shuffled examples ---------------------------------------------
def in_context(model, cfg: BenchConfig, device: str, log: Log, quick: bool = False) -> dict:
    """Outputs must follow the examples (incontext.py); needs the shared data's multi-label cases.
    The quick run scores the model alone (auto's self-check would quadruple its cost)."""
    from medgen_dev.bench.incontext import ambiguity

    if cfg.data_root is None:
        return {"rows": [], "summary": {}, "skipped": "no shared data folder in this configuration"}
    return ambiguity(model, cfg.data_root, device, log, n_query=3 if cfg.crop else 6, auto=not quick)


# -- 3. image tasks ----------------------------------------------------------------------------------
def image_tasks(model, cfg: BenchConfig, device: str, log: Log) -> tuple[dict, dict]:
    rows, pictures = [], {}
    runners = {"denoise": _denoise, "inpaint": _inpaint, "synthesize": _synthesize}
    for case in cfg.image_cases:
        row, pic = runners[case.task](model, case, cfg, device)
        row.update(case=case.name, task=case.task, seen=case.seen, modality=case.modality)
        rows.append(row)
        pictures[case.name] = pic
        log(f"{case.name}: " + ", ".join(f"{m} {v['psnr']:.2f} dB" for m, v in row["methods"].items()))
    return {"rows": rows}, pictures


def _split_slices(region: np.ndarray, n_examples: int, n_eval: int, gap: int = 3) -> tuple[list[int], list[int]]:
    """Example slices and scored slices, disjoint and at least `gap` slices apart (neighbouring
    slices are near-copies: scoring next to an example would flatter everyone)."""
    candidates = [int(s) for s in np.nonzero(region.mean((1, 2)) > 0.05)[0]]
    if len(candidates) < 2:
        candidates = [int(s) for s in np.nonzero(region.any((1, 2)))[0]]
    examples = even_slices(candidates, n_examples)
    far = [c for c in candidates if all(abs(c - e) >= gap for e in examples)]
    return examples, even_slices(far or [c for c in candidates if c not in examples], n_eval)


def _read_case(case: ImageCase) -> tuple[Volume, int, np.ndarray]:
    image = read_volume(case.image)
    image = image.with_array(image.array.astype(np.float32))
    axis = parse_axis(case.axis, image)
    return image, axis, np.moveaxis(image.array, axis, 0)


def _region(ref: np.ndarray, case: ImageCase) -> np.ndarray:
    return ref > case.foreground_above if case.foreground_above is not None else np.ones(ref.shape, bool)


def _stack(vol: Volume, array: np.ndarray, axis: int) -> Volume:
    """A volume of just the scored slices (image tasks are slice-wise: same answer, a fraction of
    the time), kept on the original spacing."""
    return Volume(np.ascontiguousarray(np.moveaxis(array, 0, axis)), vol.spacing, vol.origin, vol.direction)


def _denoise(model, case: ImageCase, cfg: BenchConfig, device: str) -> tuple[dict, dict]:
    from medgen.infer.pipeline import RunOptions

    image, axis, clean = _read_case(case)
    norm = fit_normalizer(image.array, case.modality)
    noisy = add_noise(clean, case.modality, case.noise, norm, np.random.default_rng(cfg.seed))
    region = _region(clean, case)
    ex, ev = _split_slices(region, cfg.image_examples, cfg.eval_slices)
    noisy_vol = _stack(image, noisy, axis)
    examples = pairs_from_volumes(noisy_vol, image, axis, ex, "denoise", case.modality, own=False)
    query, options = _stack(image, noisy[ev], axis), RunOptions("denoise", axis, case.modality, device)
    ours, auto, check = _model_and_auto(model, query, examples, options)
    n = fit_normalizer(noisy_vol.array, case.modality)  # the baselines see the same scaling
    xs, ys = [n(noisy[i]) for i in ex], [n(clean[i]) for i in ex]
    sigma = bl.noise_sigma(xs, ys)
    nlm = lambda x, h: bl.nl_means(x, h, sigma)
    h = bl.pick_parameter(nlm, bl.NLM_FACTORS, xs, ys)
    w = bl.pick_parameter(bl.tv, bl.TV_WEIGHTS, xs, ys)
    preds = {"ours": np.moveaxis(ours.array, axis, 0), "auto": np.moveaxis(auto, axis, 0), "noisy input": noisy[ev],
             f"NL-means (h={h:g} sigma)": np.stack([n.inverse(nlm(n(noisy[i]), h)) for i in ev]),
             f"TV Chambolle (w={w:g})": np.stack([n.inverse(bl.tv(n(noisy[i]), w)) for i in ev])}
    return _score(preds, clean[ev], region[ev], ex, ev, {"noise_level": case.noise, "auto": check})


def _inpaint(model, case: ImageCase, cfg: BenchConfig, device: str) -> tuple[dict, dict]:
    from medgen.infer.pipeline import RunOptions

    image, axis, clean = _read_case(case)
    hole_vol = mask_on_image(case.mask, case.image) & _region(image.array, case)
    hole = np.moveaxis(hole_vol, axis, 0)
    holed = np.where(hole, 0, clean).astype(np.float32)
    _, ev = _split_slices(hole, 0, cfg.eval_slices, gap=0)
    examples = inpaint_self_examples(_stack(image, holed, axis), _stack(image, hole.astype(np.uint8), axis),
                                     axis, case.modality)
    query, options = _stack(image, holed[ev], axis), RunOptions("inpaint", axis, case.modality, device)
    holes = _stack(image, hole[ev].astype(np.uint8), axis)
    ours, auto, check = _model_and_auto(model, query, examples, options, mask=holes)
    preds = {"ours": np.moveaxis(ours.array, axis, 0), "auto": np.moveaxis(auto, axis, 0),
             "biharmonic (scikit-image)": np.stack([bl.biharmonic(holed[i], hole[i]) for i in ev])}
    return _score(preds, clean[ev], hole[ev], [], ev, {"hole_voxels": int(hole.sum()), "auto": check})


def _synthesize(model, case: ImageCase, cfg: BenchConfig, device: str) -> tuple[dict, dict]:
    from medgen.infer.pipeline import RunOptions

    image, axis, src = _read_case(case)
    target = read_volume(case.target)
    if not image.same_grid(target):
        from medgen.core.errors import InputError
        raise InputError(f"{case.target}: synthesis target must be on the input's grid")
    dst = np.moveaxis(target.array.astype(np.float32), axis, 0)
    region = _region(src, case) | _region(dst, case)
    ex, ev = _split_slices(region, cfg.image_examples, cfg.eval_slices)
    examples = pairs_from_volumes(image, target, axis, ex, "synthesize", case.modality, own=False)
    query, options = _stack(image, src[ev], axis), RunOptions("synthesize", axis, case.modality, device)
    ours, auto, check = _model_and_auto(model, query, examples, options)
    x_ex, y_ex = src[ex][region[ex]], dst[ex][region[ex]]
    fill = lambda values: np.where(region[ev], 0, dst[ev].min()).astype(np.float32) + _scatter(region[ev], values)
    preds = {"ours": np.moveaxis(ours.array, axis, 0), "auto": np.moveaxis(auto, axis, 0),
             "histogram matching": fill(bl.histogram_match(src[ev][region[ev]], y_ex)),
             "linear intensity map": fill(bl.linear_map(x_ex, y_ex, src[ev][region[ev]]))}
    return _score(preds, dst[ev], region[ev], ex, ev, {"target": case.target.name, "auto": check})


def _scatter(region: np.ndarray, values: np.ndarray) -> np.ndarray:
    out = np.zeros(region.shape, np.float32)
    out[region] = values
    return out


def _score(preds: dict, ref: np.ndarray, region: np.ndarray, ex: list[int], ev: list[int],
           extra: dict) -> tuple[dict, dict]:
    methods = {name: image_scores(p, ref, region) for name, p in preds.items()}
    row = {"example_slices": ex, "scored_slices": ev, "scored_voxels": int(region.sum()),
           "methods": methods, **extra}
    mid = int(np.argmax(region.sum((1, 2))))  # the montage shows the slice with most scored voxels
    pic = {"slice": ev[mid], "reference": ref[mid], "region": region[mid],
           "preds": {m: p[mid] for m, p in preds.items()}}
    return row, pic


# -- 4. speed and memory -----------------------------------------------------------------------------
def speed(model, cfg: BenchConfig, device: str, model_spec: str | None, log: Log) -> dict:
    """FLOPs per slice against k for both networks, then whole volumes in child processes on CPU
    and (when present) CUDA. The reference's cost per slice does not depend on the volume, so it
    times a central slab (`speed.slab` slices) and extrapolates; so does our denoising on volumes
    of at least `speed.slab_from` voxels. Our propagation always runs the whole volume."""
    import torch

    from medgen_dev.bench import speed as sp
    from medgen.nn.model import count_parameters

    ref = sp.universeg_reference()
    out = {"ours_parameters": count_parameters(model), "reference_parameters": count_parameters(ref),
           "flops": [], "volumes": [], "flops_size": cfg.speed.flops_size}
    for k in cfg.speed.k:
        q, enc = sp.flops_per_slice(model, k, cfg.speed.flops_size)
        out["flops"].append({"k": k, "ours_query_gflops": q, "ours_context_gflops": enc,
                             "reference_query_gflops": sp.universeg_flops(ref, k)})
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and device != "cpu" else [])
    for dev in devices:
        for shape in cfg.speed.sizes:
            slab = cfg.speed.slab if shape[0] > cfg.speed.slab else 0
            big = int(np.prod(shape)) >= cfg.speed.slab_from
            for k in cfg.speed.k:
                runs = [("segment", "medgen", 0)] if "segment" in cfg.speed.tasks else []
                if "denoise" in cfg.speed.tasks and k in cfg.speed.denoise_k:
                    runs.append(("denoise", "medgen", slab if big else 0))
                runs.append(("segment", "universeg", slab))
                for task, net, cut in runs:
                    out["volumes"].append(sp.measure_volume(task, shape, k, dev, net, model_spec, slab=cut))
                    _log_speed(log, out["volumes"][-1])
    out["user_runs"] = [_user_run(r, model_spec, log) for r in cfg.speed.user_runs]
    return out


def _user_run(r: dict, model_spec: str | None, log: Log) -> dict:
    """One `medgen run` as a user meets it: a fresh process, per stage, cold and (if asked) warm."""
    from medgen_dev.bench import stages

    m = stages.measure(r["shape"], r["labels"], r["task"], r["warm"], r["method"], model_spec)
    warm = m["runs"][1]["engine"] if len(m["runs"]) > 1 else None
    row = {**r, "shape": list(r["shape"]), "cold_wall": m["cold_wall"], "stages": m["stages"],
           "warm_engine": warm, "peak_rss_mb": m["peak_rss_mb"], "chosen": m["chosen"]}
    log(f"user run {r['task']} {tuple(r['shape'])} {r['labels']} label(s) method {r['method']}: cold "
        f"{row['cold_wall']:.1f} s" + (f", warm {warm:.1f} s" if warm is not None else "")
        + f", peak RSS {row['peak_rss_mb']:.0f} MB; {'; '.join(row['chosen'])}")
    return row


def _log_speed(log: Log, r: dict) -> None:
    log(f"{r['net']} {r['task']} {tuple(r['shape'])} k={r['k']} {r['device']}: {r['seconds']:.1f} s "
        f"({r['seconds_per_slice']:.3f} s/slice{', extrapolated' if r['extrapolated'] else ''}), "
        f"peak RSS {r['peak_rss_mb']:.0f} MB")
