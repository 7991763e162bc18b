"""`medgen batch MANIFEST`: many `medgen run` cases in one process, resumable, shardable.

Each manifest row is one `medgen run`: the row is turned into that command's arguments and run
through the same code (so outputs are byte-identical to separate `medgen run` calls), but the
imports, the model and the example files shared between rows are loaded once per process.

Manifest: CSV (a header row) or JSON (a list of objects, or {"cases": [...]}), columns:
  image (required), output (required), task (default segment),
  labels      the image's own labels / second contrast (run's --context-target alone),
  slices      example slice indices, e.g. "12,40,71",
  context_images / context_targets   other images' example pairs (";"-separated in CSV),
  mask, modality, axis, mode, model, seed, adapt_steps, device, threads,
  options     any further `medgen run` options as one string, e.g. "--modality ct",
  id          the case's name in the journal (default: the output path).
Relative paths are read from the manifest's folder.

Journal (default MANIFEST.journal.jsonl): one JSON line per finished case, done or failed with
its one-line reason. A rerun skips the cases whose output exists and whose last journal entry
says done; failed cases run again. A failing case never stops the others.

Sharding: under `torchrun` (RANK / WORLD_SIZE in the environment) each rank takes every
WORLD_SIZE-th case of the manifest and writes its own journal file (JOURNAL.rank<r>, so no two
processes append to one file, also across nodes on a shared folder); the ranks meet at a gloo
barrier and rank 0 prints the summary of all journals. No scheduler of our own: torchrun's
elastic launcher starts, numbers and restarts the processes, and a restarted rank resumes from
the journals.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from medgen.core.errors import InputError, MedGenError

LIST_KEYS = ("context_images", "context_targets")
FLAGS = {"task": "--task", "image": "--image", "output": "--out", "labels": "--context-target",
         "slices": "--context-slices", "mask": "--mask", "modality": "--modality", "axis": "--axis",
         "mode": "--mode", "model": "--model", "seed": "--seed", "adapt_steps": "--adapt-steps",
         "device": "--device", "threads": "--threads"}
PATH_KEYS = ("image", "output", "labels", "mask") + LIST_KEYS


@dataclass
class Case:
    id: str
    output: Path
    argv: list[str]  # `medgen run` arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="medgen batch", description="run many cases from a manifest "
                                "(CSV or JSON), resumable; shard it with torchrun --nproc_per_node N")
    p.add_argument("manifest", help="CSV or JSON: image, output, task, labels or context pairs per row")
    p.add_argument("--journal", help="results and failures, one JSON line per case "
                                     "(default: MANIFEST.journal.jsonl)")
    p.add_argument("--redo", action="store_true", help="run finished cases again")
    p.add_argument("--quiet", action="store_true", help="no per-case lines (the summary still prints)")
    return p


def read_manifest(path: Path) -> list[Case]:
    """The manifest's rows as `medgen run` argument lists, with one-line errors for bad rows."""
    if not path.is_file():
        raise InputError(f"{path}: manifest not found")
    text = path.read_text()
    if path.suffix.lower() == ".json":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}: not valid JSON ({err}): give a list of cases") from err
        rows = raw.get("cases") if isinstance(raw, dict) else raw
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise InputError(f"{path}: a JSON manifest is a list of cases (objects with image, output, ...)")
    else:
        rows = [{k.strip(): (v or "").strip() for k, v in r.items() if k} for r in csv.DictReader(text.splitlines())]
    if not rows:
        raise InputError(f"{path}: the manifest holds no case")
    cases = [_case(row, path.parent, i + 1) for i, row in enumerate(rows)]
    seen: dict[str, int] = {}
    for i, c in enumerate(cases):
        if str(c.output) in seen:
            raise InputError(f"{path}: rows {seen[str(c.output)] + 1} and {i + 1} write the same output "
                             f"{c.output}: give each case its own output")
        seen[str(c.output)] = i
    return cases


def _case(row: dict, root: Path, number: int) -> Case:
    unknown = set(row) - set(FLAGS) - set(LIST_KEYS) - {"options", "id"}
    if unknown:
        raise InputError(f"manifest row {number}: unknown column(s) {', '.join(sorted(unknown))}: "
                         f"use {', '.join(list(FLAGS) + list(LIST_KEYS) + ['options', 'id'])}")
    for key in ("image", "output"):
        if not row.get(key):
            raise InputError(f"manifest row {number}: no {key}: every case needs an image and an output")
    values = {k: v for k, v in row.items() if v not in (None, "", [])}
    values.setdefault("task", "segment")
    for key in PATH_KEYS:
        if key in values:
            items = _list(values[key]) if key in LIST_KEYS else [str(values[key])]
            items = [str(p if Path(p).is_absolute() or "://" in p else root / p) for p in items]
            values[key] = items if key in LIST_KEYS else items[0]
    argv = []
    for key, flag in FLAGS.items():
        if key in values:
            argv += [flag, str(values[key])]
    for key, flag in (("context_images", "--context-image"), ("context_targets", "--context-target")):
        for item in values.get(key, []):
            argv += [flag, item]
    options = values.get("options", "")
    argv += options.split() if isinstance(options, str) else [str(o) for o in options]
    return Case(str(values.get("id") or values["output"]), Path(values["output"]), argv)


def _list(value) -> list[str]:
    if isinstance(value, list):
        return [str(v) for v in value]
    return [v.strip() for v in str(value).split(";") if v.strip()]


# -- the journal ------------------------------------------------------------------------------------
def journal_files(journal: Path) -> list[Path]:
    return ([journal] if journal.exists() else []) + sorted(journal.parent.glob(journal.name + ".rank*"))


def read_journal(journal: Path) -> dict[str, dict]:
    """The last entry per case id over the journal and its per-rank files (later lines win)."""
    last: dict[str, dict] = {}
    for f in journal_files(journal):
        for line in f.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a killed process: that case runs again
                continue
            if isinstance(entry, dict) and "id" in entry:
                if entry["id"] not in last or entry.get("time", 0) >= last[entry["id"]].get("time", 0):
                    last[entry["id"]] = entry
    return last


def _append(journal: Path, entry: dict) -> None:
    with open(journal, "a") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


# -- running ---------------------------------------------------------------------------------------
def _rank() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) when run directly."""
    try:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise InputError("RANK / WORLD_SIZE in the environment are not whole numbers: start the "
                         "batch with torchrun, or without them") from err


def run_case(case: Case, models: dict, quiet: bool) -> tuple[str, str]:
    """One case through `medgen run`'s own code: ("done" | "failed", one-line reason)."""
    from medgen.cli import build_parser as run_parser
    from medgen.commands import run_command

    try:
        args = run_parser().parse_args(["run", *case.argv] + (["--quiet"] if quiet else []))
    except SystemExit:
        return "failed", f"invalid options for this case: {' '.join(case.argv)}"
    try:
        code = run_command(args, models=models)
    except MedGenError as err:
        return "failed", str(err).splitlines()[0] if str(err) else type(err).__name__
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as err:  # noqa: BLE001 (a bug in one case must not stop the others: journal it)
        return "failed", f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}".strip()
    return ("done", "") if code == 0 else ("failed", "cancelled")


def batch(manifest: Path, journal: Path | None = None, redo: bool = False, quiet: bool = False) -> int:
    """Run this rank's share of the manifest; rank 0 prints the summary and exits 1 when some
    case of the whole manifest failed (0 when every case is done)."""
    cases = read_manifest(manifest)
    journal = journal or manifest.with_name(manifest.name + ".journal.jsonl")
    rank, world = _rank()
    mine = cases[rank::world]
    own_journal = journal if world == 1 else journal.with_name(f"{journal.name}.rank{rank}")
    finished = {} if redo else read_journal(journal)
    todo = [c for c in mine if not (finished.get(c.id, {}).get("status") == "done" and c.output.exists())]
    say = (lambda m: None) if quiet else (lambda m: print(f"medgen batch{f' [rank {rank}]' if world > 1 else ''}: {m}",
                                                          file=sys.stderr, flush=True))
    say(f"{len(mine)} case(s) in this share, {len(mine) - len(todo)} already done, {len(todo)} to run")
    models: dict = {}
    start = time.perf_counter()
    inner_quiet = quiet or world > 1 or not sys.stderr.isatty()
    for i, case in enumerate(todo):
        t = time.perf_counter()
        say(f"[{i + 1}/{len(todo)}] {case.id} ...")
        status, reason = run_case(case, models, inner_quiet)
        seconds = time.perf_counter() - t
        _append(own_journal, {"id": case.id, "output": str(case.output), "status": status, "reason": reason,
                              "seconds": round(seconds, 2), "rank": rank, "time": time.time()})
        left = (time.perf_counter() - start) / (i + 1) * (len(todo) - i - 1)
        say(f"[{i + 1}/{len(todo)}] {case.id}: {status}{': ' + reason if reason else ''} "
            f"({seconds:.1f} s; about {left:.0f} s left)")
    _barrier(world)
    results = read_journal(journal)
    if rank == 0:
        print(summary(cases, results), file=sys.stderr if quiet else sys.stdout, flush=True)
    if rank != 0:  # rank 0 speaks for all: one failure report from torchrun, not one per rank
        return 0
    return 0 if all(results.get(c.id, {}).get("status") == "done" for c in cases) else 1


def _barrier(world: int) -> None:
    """Wait for every rank (gloo: CPU-only and multi-node alike) before the summary is read."""
    if world <= 1:
        return
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    dist.barrier()
    dist.destroy_process_group()


def summary(cases: list[Case], results: dict[str, dict]) -> str:
    """A table of every case: status, seconds and the one-line reason of failures."""
    lines = ["| case | status | seconds | reason |", "|---|---|---|---|"]
    for c in cases:
        r = results.get(c.id, {})
        lines.append(f"| {c.id} | {r.get('status', 'not run')} | {r.get('seconds', '')} | {r.get('reason', '')} |")
    done = sum(results.get(c.id, {}).get("status") == "done" for c in cases)
    failed = sum(results.get(c.id, {}).get("status") == "failed" for c in cases)
    lines.append(f"\n{done} done, {failed} failed, {len(cases) - done - failed} not run, of {len(cases)}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return batch(Path(args.manifest), Path(args.journal) if args.journal else None, args.redo, args.quiet)
