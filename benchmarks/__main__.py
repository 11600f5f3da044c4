"""``python -m benchmarks NAME [--quick] [--json PATH]``: run one benchmark and print its ratios."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence

import benchmarks
from benchmarks.harness import environment, format_table, write_json

_NOT_BENCHMARKS = {"harness"}


def available() -> list[str]:
    """Names of the benchmark modules (and packages) in this folder."""
    return sorted(
        info.name
        for info in pkgutil.iter_modules(benchmarks.__path__)
        if not info.name.startswith("_") and info.name not in _NOT_BENCHMARKS
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("name", nargs="?", help="benchmark to run (see --list)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    names = available()
    if args.list or args.name is None:
        print("\n".join(names) if names else "(no benchmarks yet)")
        return 0 if args.list else 2
    if args.name not in names:
        parser.error(f"unknown benchmark {args.name!r}; choose one of {', '.join(names) or '(none yet)'}")
    module = importlib.import_module(f"benchmarks.{args.name}")
    print(f"# {args.name}: ours / anchor, medians of interleaved repeats; {environment()}")
    measurements = module.run(quick=args.quick)
    print(format_table(measurements))
    if args.json:
        write_json(args.json, args.name, measurements)
    return 0


if __name__ == "__main__":
    sys.exit(main())
