"""The accuracy table over the embedded zoo: every method, every task.

    python -m benchmarks.accuracy            # full run (the README's main job)
    python -m benchmarks.accuracy --quick    # CI-sized

    python -m benchmarks.accuracy --extended # the second command: WEMoE router and objective variants
    python -m benchmarks.accuracy --extended --only ROW ...  # rerun some; carry the rest over by their arguments
    python -m benchmarks.accuracy --only wemoe-best          # a main WEMoE row again; the other rows carried over

Builds the zoo if it is not cached, then runs the real `wemoe merge` and
`wemoe eval` commands for: the pretrained base, each individual fine-tuned
model, simple average, task arithmetic (lambda chosen on a grid using labelled
TRAIN images, and lambda 0.3), TIES, AdaMerging (task- and layer-wise,
coefficients adapted on the unlabeled TEST images), the paper's WEMoE (routers
adapted on the unlabeled TEST images, as test-time adaptation does) and the
recommended WEMoE configuration (routers adapted on the TRAIN split's unlabeled
images, evaluated on the test split), each with its own-expert ceiling. Writes
accuracy.md/.json/.png to benchmarks/results/ (or --results); ``--extended``
adds its rows to the same files.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from benchmarks.accuracy.render import markdown, write_results
from benchmarks.accuracy.rows import BEST, EXTENDED_WEMOE, MAIN_WEMOE, PAPER
from benchmarks.accuracy.runner import Zoo, evaluate, row, run, run_merge
from benchmarks.common import RESULTS


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="CI size: small zoo, few adaptation steps")
    ap.add_argument("--extended", action="store_true", help="the second command: WEMoE router/objective variants (rows marked --extended)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--cache", type=Path, default=None)
    ap.add_argument(
        "--only",
        nargs="+",
        choices=[*MAIN_WEMOE, *EXTENDED_WEMOE],
        metavar="ROW",
        help="run only these WEMoE rows (with --extended: of the extended ones); every other row is carried over from the last "
        "results, extended ones only where an earlier row recorded the same arguments",
    )
    args = ap.parse_args(argv)
    wrong = [r for r in args.only or [] if (r in EXTENDED_WEMOE) != args.extended]
    if wrong:
        ap.error(f"--only {' '.join(wrong)}: " + ("not an --extended row" if args.extended else "an --extended row: add --extended"))
    if args.only and args.quick:
        ap.error("--only reruns rows of the full table, not of --quick")
    os.environ.setdefault("TQDM_MININTERVAL", "5")
    run(args.quick, args.results, args.cache, args.extended, args.only)
    print()
    print((args.results / ("accuracy_quick.md" if args.quick else "accuracy.md")).read_text())


__all__ = ["BEST", "PAPER", "RESULTS", "Zoo", "evaluate", "main", "markdown", "row", "run", "run_merge", "write_results"]
