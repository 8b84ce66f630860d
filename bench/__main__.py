"""Dispatch `python -m bench NAME ...` to bench/NAME.py's `main(argv)`; each benchmark owns its flags."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def available() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules([str(HERE)])
                  if not m.name.startswith("_") and m.name != "common")


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m bench NAME [options]\nbenchmarks: " + ", ".join(available()))
        return 0 if argv else 2
    name = argv[0].replace("-", "_")
    if name.replace("_", "-") not in available():
        print(f"unknown benchmark {argv[0]!r}; choose from: {', '.join(available())}", file=sys.stderr)
        return 2
    module = importlib.import_module(f"bench.{name}")
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
