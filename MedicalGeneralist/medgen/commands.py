"""What `medgen run` and `medgen models` do, once the arguments are parsed.

Kept apart from the parser so the order of checks is readable: everything that can be checked
before the model runs (files, shapes, grids, device, weights, output path) is checked first, so a
mistake costs seconds, not a full propagation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medgen.core.device import resolve_device
from medgen.core.errors import InputError
from medgen.prompts import examples_from_files, inpaint_self_examples, parse_slices
from medgen.io.images import check_writable, read_volume, same_file, write_volume
from medgen.core.intensity import guess_modality
from medgen.infer.pipeline import RunOptions, check_mask_grid, run_with_report, segment_mode
from medgen.infer.selfcheck import check_method
from medgen.infer.segment import SegmentSettings
from medgen.core.volume import parse_axis
from medgen.io.weights import download_model, list_models, load_model, verify_all, verify_model


def run_command(args: argparse.Namespace, models: dict | None = None) -> int:
    """One `medgen run`. `models` (model spec -> (model, info)) lets `medgen batch` load each model
    once per process; the run itself never changes the model (adaptation tunes a copy)."""
    out = check_writable(args.out)
    _check_not_an_input(out, args)
    report_path = _check_report(args.report) if getattr(args, "report", None) else None
    method = getattr(args, "method", "auto")
    resolve_device(args.device)
    image = read_volume(args.image)
    if out.suffix.lower() == ".png" and image.shape[0] > 1:
        raise InputError(f"{out}: a PNG holds one 2D image but the input has {image.shape[0]} slices: "
                         "write .nii.gz, .nrrd or .mha")
    modality = args.modality or guess_modality(image.array)
    axis = parse_axis(args.axis, image)
    mask = read_volume(args.mask, label=True) if args.mask else None
    if mask is not None:
        check_mask_grid(image, mask)  # before the examples and the model: a mistake costs seconds
    examples = examples_from_files(args.task, image, args.context_image, args.context_target,
                                   parse_slices(args.context_slices), args.axis, modality)
    if args.task == "inpaint" and not examples:
        if not args.mask:
            raise InputError("no examples: give --mask (examples are then made from the image itself), "
                             "or --context-image with --context-target")
        if mask is None or mask.shape != image.shape:
            raise InputError("inpaint needs --mask with the image's shape")
        examples = inpaint_self_examples(image, mask, axis, modality)
    mode = segment_mode(args.mode, image, examples) if args.task == "segment" else None
    check_method(args.task, method)
    models = {} if models is None else models
    if args.model not in models:
        models[args.model] = load_model(args.model, device="cpu")
    model, info = models[args.model]
    options = RunOptions(args.task, axis, modality, args.device, args.threads, args.seed,
                         args.adapt_steps, segment=SegmentSettings(mode=mode or "auto"), method=method)
    if not args.quiet:
        how = f", {mode}" if mode else ""
        print(f"medgen: {args.task} with {len(examples)} example(s){how}, model {info.id}, "
              f"modality {modality}, axis {axis}", file=sys.stderr)
    with _progress_bar(args.quiet) as progress:
        result = run_with_report(model, image, examples, options, mask=mask,
                                 progress=_stop_on_interrupt(progress))
    if result is None:
        print("medgen: cancelled; nothing was written", file=sys.stderr)
        return 1
    _stop_on_interrupt(lambda f, m: None)(1.0, "")  # a swallowed Ctrl-C: never write after it
    write_volume(result.volume, out)
    for line in result.report.lines():  # the self-check: chosen method and estimates per label/task
        print(line)
    if report_path is not None:
        result.report.write_json(report_path)
    if not args.quiet:
        print(f"medgen: wrote {out}" + (f" and {report_path}" if report_path else ""), file=sys.stderr)
    return 0


def _check_not_an_input(out: Path, args: argparse.Namespace) -> None:
    """The output must never overwrite an input (also through a symlink or another spelling)."""
    inputs = [("image", args.image), ("mask", args.mask)]
    inputs += [("example image", p) for p in args.context_image]
    inputs += [("example target", p) for p in args.context_target]
    for what, path in inputs:
        if path and same_file(out, path):
            raise InputError(f"the output {out} is the {what} {path}: choose another output file; "
                             "inputs are never overwritten")


def _stop_on_interrupt(progress):
    """Wrap the engine's progress callback: a Ctrl-C a native library swallowed stops the run."""
    from medgen.cli import interrupted

    def update(fraction: float, message: str) -> None:
        if interrupted():
            raise KeyboardInterrupt
        progress(fraction, message)
    return update


def _check_report(path: str) -> Path:
    """The report sidecar is JSON and its folder must exist (checked before any work)."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        raise InputError(f"{path}: the report is JSON: give a path ending in .json")
    if not path.parent.exists() and path.parent != Path(""):
        raise InputError(f"{path}: report folder {path.parent} does not exist")
    return path


class _progress_bar:
    """A tqdm bar on stderr fed by the engine's (fraction, message) callback."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet

    def __enter__(self):
        if self.quiet:
            return lambda f, m: None
        from tqdm import tqdm
        self.bar = tqdm(total=1000, file=sys.stderr, bar_format="{l_bar}{bar}| {elapsed}<{remaining} {postfix}")

        def update(fraction: float, message: str) -> None:
            self.bar.n = int(fraction * 1000)
            self.bar.set_postfix_str(message, refresh=True)
        return update

    def __exit__(self, *exc) -> None:
        if not self.quiet:
            self.bar.close()


def models_command(args: argparse.Namespace) -> int:
    if args.action == "list":
        for m in list_models():
            flag = "*" if m.get("default") else " "
            state = "available" if m.get("available") else "not downloaded"
            print(f"{flag} {m['id']:<24} {m['parameters'] / 1e6:5.2f}M  {','.join(m['tasks'])}  "
                  f"{','.join(m['modalities'])}  {m['license']}  [{state}]")
        return 0
    if args.action == "verify":
        print("\n".join(verify_all() if not args.id else [verify_model(args.id)]))
        return 0
    if not args.id:
        raise InputError(f"medgen models {args.action} needs a model id: see `medgen models list`")
    resolved = download_model(args.id)
    print(f"{args.id}: {resolved.weights_path}")
    return 0
