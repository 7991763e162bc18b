"""`medgen`: the command line. Its options are a contract other tools call exactly as documented.

User errors (MedGenError) print one line saying what was wrong and what to do, exit with 2 and
leave no output file; outputs are written to a temporary name and renamed only on success.
Option values are checked by argparse types, so a bad number is a one-line usage error too.
Ctrl-C exits with 130 and writes nothing, even when it arrives while a native library (ITK's first
import) swallows the KeyboardInterrupt: the handler records it and the run checks the record.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from medgen.core.config import TASKS
from medgen.core.errors import MedGenError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
AXES = ("0", "1", "2", "axial", "coronal", "sagittal")
_SIGINTS: list[float] = []  # times of Ctrl-C seen by this process's handler
# Developer commands live in medgen_dev (a checkout, never the wheel or Slicer); their options are
# parsed there, so building this parser imports neither the benchmark nor the trainer.
DEV_COMMANDS = {
    "bench": ("medgen_dev.bench.runner", "accuracy against users' baselines, speed and memory"),
    "train": ("medgen_dev.train.trainer", "train a model from a YAML/JSON config"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block): the rule for every refusal."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _whole(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi]."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{value} is out of range ({lo}..{hi if hi is not None else ''})")
        return value
    parse.__name__ = "whole number"
    return parse


def _axis(text: str) -> str:
    value = text.strip().lower()
    if value not in AXES:
        what = f"axis {text} is out of range" if value.isascii() and value.lstrip("-").isdigit() \
            else f"unknown axis {text!r}"
        raise argparse.ArgumentTypeError(f"{what}: use 0, 1, 2, axial, coronal or sagittal")
    return value


def interrupted() -> bool:
    """True once Ctrl-C reached this process, even if a library swallowed the KeyboardInterrupt."""
    return bool(_SIGINTS)


def _on_sigint(signum, frame) -> None:
    import time

    _SIGINTS.append(time.monotonic())
    raise KeyboardInterrupt


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medgen", description="In-context medical image-to-image "
                                     "model: show a few example pairs, get the rest of the volume done.")
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="do a task on an image or volume from example pairs")
    r.add_argument("--task", required=True, choices=TASKS)
    r.add_argument("--image", required=True, help="query image or volume (NIfTI, NRRD, MHA, DICOM folder, PNG/JPG)")
    r.add_argument("--out", required=True, help="output file (.nii.gz, .nrrd, .mha, .png)")
    r.add_argument("--context-image", action="extend", nargs="+", default=[], metavar="PATH",
                   help="example input(s): several after one flag, or the flag repeated")
    r.add_argument("--context-target", action="extend", nargs="+", default=[], metavar="PATH",
                   help="example target(s), paired with the example inputs in order")
    r.add_argument("--context-slices", help="slice indices along --axis, e.g. 12,40,71")
    r.add_argument("--axis", default=None, type=_axis, help="0, 1, 2, axial, coronal or sagittal (default: axial)")
    r.add_argument("--mask", help="inpainting mask: non-zero voxels are filled")
    r.add_argument("--modality", choices=["ct", "mr", "xray", "us", "other"], help="default: guessed (CT from HU values, else other)")
    r.add_argument("--model", default=None, help="model id from Models.json, a local path, or hf://org/repo@revision")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    r.add_argument("--adapt-steps", type=_whole(0, 100_000), default=None,
                   help="test-time fine-tuning steps on the examples (default: 40 when segmenting "
                        "from other images' examples, else 0; 0 turns it off)")
    r.add_argument("--seed", type=_whole(0, 2**32 - 1), default=0, help="random seed (0..4294967295)")
    r.add_argument("--mode", choices=["auto", "propagate", "independent"], default="auto",
                   help="segmentation: march from the image's own labelled slices (propagate), each "
                        "slice alone (independent), or auto: propagate when some example is a slice "
                        "of the image, else independent")
    r.add_argument("--method", default="auto",
                   help="auto (default: a self-check on the examples picks the best method per label or "
                        "task), model, or a classical method: fill, registration, nearest (segmentation by "
                        "propagation), classifier (segmentation slice by slice: a pixel classifier), "
                        "nl-means, tv (denoise), linear, histogram (synthesize), biharmonic (inpaint)")
    r.add_argument("--report", default=None, metavar="PATH",
                   help="write the self-check's report (chosen method, leave-one-out estimates) as JSON here")
    r.add_argument("--threads", type=_whole(1, 4096), default=None, help="CPU threads (default: all cores)")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    m = sub.add_parser("models", help="list, verify or download models")
    m.add_argument("action", nargs="?", default="list", choices=["list", "verify", "download"])
    m.add_argument("id", nargs="?", help="registry id or checkpoint path (verify: all registry "
                   "models when left out)")
    d = sub.add_parser("demo", help="run the shipped demo (no network, no shared data needed)")
    d.add_argument("--out", default="medgen-demo", help="output folder (default: ./medgen-demo)")
    d.add_argument("--device", default="auto")
    b = sub.add_parser("batch", help="run many cases from a CSV/JSON manifest (resumable; shard with "
                       "torchrun): see `medgen batch --help`", add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    for name, (_module, text) in DEV_COMMANDS.items():
        dev = sub.add_parser(name, help=text + " (developer command: needs a checkout)", add_help=False)
        dev.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DEV_COMMANDS:
        return _dev_command(argv[0], argv[1:])
    if argv and argv[0] == "batch":
        return _guarded(lambda: __import__("medgen.batch", fromlist=["main"]).main(argv[1:]))
    args = build_parser().parse_args(argv)
    _SIGINTS.clear()
    previous = signal.getsignal(signal.SIGINT)
    ours = previous is signal.default_int_handler and threading.current_thread() is threading.main_thread()
    if ours:  # not when embedded in an application that handles Ctrl-C itself
        signal.signal(signal.SIGINT, _on_sigint)
    try:
        code = _command(args)
        if interrupted():  # a library swallowed the KeyboardInterrupt: still an interruption
            raise KeyboardInterrupt
        return code
    except MedGenError as err:
        print(f"medgen: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("medgen: interrupted; nothing was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        if ours:
            signal.signal(signal.SIGINT, previous)


def _command(args: argparse.Namespace) -> int:
    if args.command == "run":
        from medgen.commands import run_command
        return run_command(args)
    if args.command == "models":
        from medgen.commands import models_command
        return models_command(args)
    if args.command == "demo":
        from medgen.demo import run_demo
        run_demo(Path(args.out), device=args.device)
        return 0
    return EXIT_USAGE


def _guarded(command, interrupted_note: str = " (finished cases are in the journal)") -> int:
    """A user error is one line and exit 2, as for `run`; Ctrl-C is exit 130."""
    try:
        return command()
    except MedGenError as err:
        print(f"medgen: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medgen: interrupted{interrupted_note}", file=sys.stderr)
        return 130


def _dev_command(name: str, rest: list[str]) -> int:
    import importlib

    try:
        module = importlib.import_module(DEV_COMMANDS[name][0])
    except ModuleNotFoundError as err:
        print(f"medgen: error: `medgen {name}` is a developer command and needs a checkout of the "
              f"repository (pip install -e . there); this installation has no {err.name}", file=sys.stderr)
        return EXIT_USAGE
    return _guarded(lambda: module.main(rest), interrupted_note="")


def entry() -> None:
    """Console-script entry point.

    This process is ours, so it may set OpenMP's behaviour before torch loads: the default
    busy-waiting makes torch 10-20x slower on a CPU shared with anything else (a Slicer GUI, a
    second job), and passive waiting costs nothing measurable on a free CPU. A user's setting wins.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_WARNINGS", "0")
    sys.exit(main())


if __name__ == "__main__":
    entry()
