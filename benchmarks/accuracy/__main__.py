"""``python -m benchmarks.accuracy``."""

from benchmarks.accuracy import main

main()
