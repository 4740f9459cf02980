"""Hashes of every merge output the accuracy table is made from: proof that a refactor changed no byte.

    python -m benchmarks.output_hashes --write FILE          # run every recorded merge, write the hashes
    python -m benchmarks.output_hashes --check FILE          # run FILE's merges again, compare, exit 1 on a difference
    python -m benchmarks.output_hashes --check FILE --report benchmarks/results/output_hashes.md
    python -m benchmarks.output_hashes --extended ...        # the `--extended` rows too (about 40 minutes)

The merges are the exact `wemoe merge` command lines recorded in
``benchmarks/results/accuracy.json`` (key ``args``), run through the real CLI
into a scratch directory. What is hashed: every
tensor of the model files and of ``heads.safetensors`` (name, dtype, shape,
bytes). The record is kept whole, less the fields that differ between identical
runs (versions, input paths, notes), and compared field by field, so a check
names every field a change added, removed or altered. The exit code is 1 when a
tensor differs; record differences are listed (a new parameter adds a field).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACCURACY = REPO / "benchmarks" / "results" / "accuracy.json"
# record fields that may differ between identical runs
VOLATILE = {"versions", "inputs", "seconds", "notes"}


def tensor_hashes(directory: Path) -> dict[str, str]:
    """``{file/tensor: sha256 of dtype, shape and bytes}`` for every safetensors file in ``directory``."""
    from safetensors import safe_open

    out: dict[str, str] = {}
    for f in sorted(directory.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for key in sorted(fh.keys()):
                t = fh.get_tensor(key)
                h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes() if t.numel() else b"")
                out[f"{f.name}/{key}"] = h.hexdigest()
    return out


def _stable(value):
    """The record without what differs between identical runs (timings, losses' wall clock)."""
    if isinstance(value, dict):
        return {k: _stable(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v) for v in value]
    return value


def stable_record(directory: Path) -> dict:
    """The output's record (wemoe.json or config.json) without what differs between identical runs."""
    path = directory / "wemoe.json" if (directory / "wemoe.json").is_file() else directory / "config.json"
    return _stable(json.loads(path.read_text()))


def record_differences(a, b, where: str = "") -> list[str]:
    """Dotted paths where two records differ: a key only one has, or a different value."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            path = f"{where}.{key}" if where else key
            if key not in a:
                out.append(f"+{path}")
            elif key not in b:
                out.append(f"-{path}")
            else:
                out += record_differences(a[key], b[key], path)
        return out
    return [] if a == b else [f"~{where}"]


def rows(extended: bool) -> dict[str, list[str]]:
    """``{row: merge arguments}`` of every merged row of accuracy.json (ceiling rows reuse their row's merge)."""
    methods = json.loads(ACCURACY.read_text())["methods"]
    out = {}
    for key, m in methods.items():
        if not m.get("args") or m.get("diagnostic"):
            continue
        if m.get("command") and not extended:
            continue
        out[key] = [str(a) for a in m["args"]]
    return out


def run_all(merges: dict[str, list[str]], only: list[str] | None = None) -> dict[str, dict]:
    from wemoe.cli import main as wemoe_main

    results: dict[str, dict] = {}
    os.chdir(REPO)  # the recorded paths are relative to the repository
    with tempfile.TemporaryDirectory(prefix="wemoe-hashes-") as scratch:
        for key, args in merges.items():
            if only and key not in only:
                continue
            out = Path(scratch) / key
            args = list(args)
            args[args.index("--out") + 1] = str(out)
            print(f"merging {key} ...", flush=True)
            try:
                wemoe_main(args)
            except SystemExit as exc:
                if exc.code:
                    raise RuntimeError(f"{key}: wemoe merge exited {exc.code}") from None
            results[key] = {"args": list(merges[key]), "record": stable_record(out), "tensors": tensor_hashes(out)}
    return results


def compare(reference: dict[str, dict], now: dict[str, dict]) -> dict[str, dict[str, list[str]]]:
    """Per merge rerun: the tensors that differ, and the record fields added (+), removed (-) or changed (~)."""
    out = {}
    for key, ref in reference.items():
        got = now.get(key)
        if got is None:
            continue
        names = set(ref["tensors"]) | set(got["tensors"])
        out[key] = {
            "tensors": sorted(n for n in names if ref["tensors"].get(n) != got["tensors"].get(n)),
            "record": record_differences(ref["record"], got["record"]),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.output_hashes", description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    ap.add_argument("--extended", action="store_true", help="--write: the --extended rows too")
    ap.add_argument("--only", nargs="+", help="only these rows")
    ap.add_argument("--report", type=Path, help="--check: also write the result as markdown here")
    ap.add_argument("--outputs", type=Path, help="--check: compare the finished outputs in this folder (one sub-folder per merge) instead of merging again")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    target = (args.write or args.check).resolve()
    reference = json.loads(target.read_text()) if args.check else {}
    # --write: the merges accuracy.json records; --check: the ones the reference file ran (the table may have moved on)
    merges = {k: v["args"] for k, v in reference.items()} if args.check else rows(args.extended)
    if args.outputs:  # what an earlier, interrupted check already wrote: compared, not rerun
        now = {
            key: {"args": list(merges[key]), "record": stable_record(args.outputs / key), "tensors": tensor_hashes(args.outputs / key)}
            for key in merges
            if (args.outputs / key / "config.json").is_file() and (not args.only or key in args.only)
        }
    else:
        now = run_all(merges, args.only)
    if args.write:
        target.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote hashes of {len(now)} merges to {target}")
        return 0
    found = compare(reference, now)
    for key, d in found.items():
        if d["tensors"]:
            print(f"DIFFERENT: {key}: {len(d['tensors'])} tensor(s) differ, e.g. {', '.join(d['tensors'][:3])}")
        if d["record"]:
            print(f"record of {key}: fields added (+), removed (-) or changed (~): {', '.join(d['record'])}")
    bad = [k for k, d in found.items() if d["tensors"]]
    print(f"{len(found)} merges compared: {'every tensor identical' if not bad else f'tensors differ in {len(bad)}'}")
    if args.report:
        write_report(args.report, target, now, found, args.outputs)
    return 1 if bad else 0


def write_report(path: Path, reference: Path, now: dict[str, dict], found: dict[str, dict[str, list[str]]], outputs: Path | None = None) -> None:
    """The check's result as markdown: which merges were rerun, at which commit, on which machine, and what differed."""
    import subprocess

    from benchmarks.common import machine_description

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() or "unknown"
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    lines = [
        "# Output hashes: same arguments, same bytes?",
        "",
        f"Generated by `python -m benchmarks.output_hashes --check {reference.relative_to(REPO) if reference.is_relative_to(REPO) else reference} "
        f"--report ...`; do not edit by hand. Checked at commit {commit}{' (with uncommitted changes)' if dirty else ''} on {machine_description()}.",
        "",
        "Each merge below was rerun through the real CLI with the arguments the reference recorded"
        + (f" (outputs read from {outputs}, written by an earlier `--check` run)" if outputs else "")
        + "; every tensor of its model and heads files (dtype, shape, bytes) and its record (less timings and versions) were "
        "compared with the reference.",
        "",
        "| merge | tensors | tensors identical | record fields added (+), removed (-), changed (~) |",
        "|---|---|---|---|",
    ]
    for key, d in found.items():
        same = f"no: {len(d['tensors'])}" if d["tensors"] else "yes"
        lines.append(f"| {key} | {len(now[key]['tensors'])} | {same} | {', '.join(d['record']) or 'none'} |")
    bad = sum(1 for d in found.values() if d["tensors"])
    lines += ["", f"{len(found)} merges rerun: " + (f"tensors differ in {bad}." if bad else "every tensor identical.")]
    path.write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
