"""``python -m benchmarks.robustness``."""

from benchmarks.robustness import main

main()
