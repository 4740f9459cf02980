"""``python -m wemoe`` (and ``torchrun -m wemoe``): the command line."""

from wemoe.cli import main

main()
