"""Hashes of every merge output the accuracy table is made from: proof that a refactor changed no byte.

    python -m benchmarks.output_hashes --write FILE          # run every recorded merge, write the hashes
    python -m benchmarks.output_hashes --check FILE          # run FILE's merges again, compare, exit 1 on a difference
    python -m benchmarks.output_hashes --extended ...        # the `--extended` rows too (about 40 minutes)

The merges are the exact `wemoe merge` command lines recorded in
``benchmarks/results/accuracy.json`` (key ``args``), run through the real CLI
into a scratch directory. What is hashed: every
tensor of the model files and of ``heads.safetensors`` (name, dtype, shape,
bytes). The record is kept whole, less the fields that differ between identical
runs (versions, input paths, notes), and compared field by field, so a check
names every field a change added, removed or altered.
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


def compare(reference: dict[str, dict], now: dict[str, dict]) -> list[str]:
    problems = []
    for key, ref in reference.items():
        got = now.get(key)
        if got is None:
            continue
        changed = record_differences(ref["record"], got["record"])
        if changed:
            problems.append(f"{key}: record fields added (+), removed (-) or changed (~): {', '.join(changed)}")
        names = set(ref["tensors"]) | set(got["tensors"])
        diff = sorted(n for n in names if ref["tensors"].get(n) != got["tensors"].get(n))
        if diff:
            problems.append(f"{key}: {len(diff)} tensor(s) differ, e.g. {', '.join(diff[:3])}")
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.output_hashes", description=__doc__.split("\n\n")[0])
    group = ap.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", type=Path, help="write the hashes to this JSON file")
    group.add_argument("--check", type=Path, help="compare with the hashes in this JSON file")
    ap.add_argument("--extended", action="store_true", help="--write: the --extended rows too")
    ap.add_argument("--only", nargs="+", help="only these rows")
    args = ap.parse_args(argv)
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    target = (args.write or args.check).resolve()
    reference = json.loads(target.read_text()) if args.check else {}
    # --write: the merges accuracy.json records; --check: the ones the reference file ran (the table may have moved on)
    merges = {k: v["args"] for k, v in reference.items()} if args.check else rows(args.extended)
    now = run_all(merges, args.only)
    if args.write:
        target.write_text(json.dumps(now, indent=1, sort_keys=True) + "\n")
        print(f"wrote hashes of {len(now)} merges to {target}")
        return 0
    problems = compare(reference, now)
    for p in problems:
        print(f"DIFFERENT: {p}")
    print(f"{len(now)} merges compared: {'all identical' if not problems else f'{len(problems)} different'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
