"""The zoo's data that pip cannot install: Fashion-MNIST and fonts, from Debian's packages.

``python -m benchmarks.accuracy`` and ``python -m benchmarks.zoo build`` call
:func:`ensure` first: missing packages are installed with apt-get when that is
possible (root on a Debian-based machine), and otherwise the run stops with one
line naming the command that installs them. ``.ci/run`` runs
``python -m benchmarks.zoo.requirements`` for the same list.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from .datasets import FASHION_DIR

# package -> a directory or file it installs (what the zoo actually reads)
PACKAGES: dict[str, str] = {
    "dataset-fashion-mnist": os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz"),
    "fonts-liberation": "/usr/share/fonts/truetype/liberation",
    "fonts-freefont-ttf": "/usr/share/fonts/truetype/freefont",
    "fonts-noto-core": "/usr/share/fonts/truetype/noto",
    "fonts-urw-base35": "/usr/share/fonts/opentype/urw-base35",
    "fonts-cantarell": "/usr/share/fonts/opentype/cantarell",
    "fonts-dejavu-core": "/usr/share/fonts/truetype/dejavu",
}


def missing() -> list[str]:
    return [pkg for pkg, path in PACKAGES.items() if not os.path.exists(path)]


def install_command(packages: list[str]) -> str:
    return "sudo apt-get install -y " + " ".join(packages)


def can_install() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get") is not None


def ensure(install: bool = True) -> None:
    """Return when every package is present; install them as root, else exit with one line."""
    todo = missing()
    if not todo:
        return
    if install and can_install():
        print(f"installing the Debian packages the zoo is built from: {' '.join(todo)}", file=sys.stderr, flush=True)
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        for cmd in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", *todo]):
            if subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL).returncode != 0:
                break
        todo = missing()
        if not todo:
            return
    raise SystemExit(
        f"error: the benchmark zoo needs data and fonts from Debian packages that are not installed ({', '.join(todo)}): run `{install_command(todo)}`"
    )


def main() -> None:
    ensure(install="--check" not in sys.argv[1:])
    print("zoo data packages: all present")


if __name__ == "__main__":
    main()
