"""Discovery and running of the demo's sections."""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["DemoContext", "available_sections", "main", "run_sections"]


@dataclass
class DemoContext:
    """What a section gets: where to write, how big to go, and where to report figures.

    :ivar out_dir: folder for the section's plots (created on demand).
    :ivar smoke: small sizes (a test or CI run) instead of the reader's full run.
    :ivar figures: ``{section: {name: value}}`` of every figure reported with :meth:`report`.
    """

    out_dir: Path
    smoke: bool = False
    figures: dict[str, dict[str, Any]] = field(default_factory=dict)
    section: str = ""

    def report(self, name: str, value: Any, unit: str = "") -> None:
        """Print one figure and keep it for the summary."""
        self.figures.setdefault(self.section, {})[name] = value
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"  {name}: {shown}{(' ' + unit) if unit else ''}", flush=True)

    def savefig(self, figure: Any, name: str) -> Path:
        """Save a matplotlib figure as ``<out_dir>/<section>_<name>.png``, close it, say where."""
        import matplotlib.pyplot as plt

        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"{self.section}_{name}.png"
        figure.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(figure)
        print(f"  plot: {path}", flush=True)
        return path


def available_sections() -> list[ModuleType]:
    """The section modules of this package, in tour order."""
    import pyro_ext.demo as package

    modules = [
        importlib.import_module(f"pyro_ext.demo.{info.name}")
        for info in pkgutil.iter_modules(package.__path__)
        if not info.name.startswith("_")
    ]
    return sorted(modules, key=lambda module: (module.ORDER, module.__name__))


def _name(module: ModuleType) -> str:
    return module.__name__.rsplit(".", 1)[-1]


def run_sections(context: DemoContext, only: Sequence[str] | None = None) -> dict[str, str]:
    """Run the sections (all, or those named in ``only``); returns ``{section: "ok" | error}``."""
    sections = available_sections()
    names = [_name(module) for module in sections]
    if only:
        unknown = sorted(set(only) - set(names))
        if unknown:
            raise ValueError(f"unknown demo section(s) {', '.join(unknown)}; choose from {', '.join(names)}")
        sections = [module for module in sections if _name(module) in only]
    status: dict[str, str] = {}
    for module in sections:
        context.section = _name(module)
        print(f"\n== {module.TITLE} [{context.section}]", flush=True)
        start = time.perf_counter()
        try:
            module.run(context)
        except Exception as error:  # one broken section must not hide the others' results
            traceback.print_exc()
            status[context.section] = f"failed: {type(error).__name__}: {error}"
        else:
            status[context.section] = "ok"
        print(f"  ({time.perf_counter() - start:.1f} s)", flush=True)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pyro_ext.demo", description="A tour of pyro_ext's parts."
    )
    parser.add_argument("--out", default="demo_output", help="folder for the plots (default: demo_output)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (also when the CI variable is set)")
    parser.add_argument("--only", nargs="+", metavar="SECTION", help="run only these sections")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    context = DemoContext(out_dir=Path(args.out).resolve(), smoke=args.smoke or bool(os.environ.get("CI")))
    print(f"pyro_ext demo ({'smoke' if context.smoke else 'full'} mode); plots go to {context.out_dir}")
    status = run_sections(context, args.only)
    print("\n== summary")
    for section, outcome in status.items():
        print(f"  {section}: {outcome}")
    print(f"plots written to {context.out_dir}")
    return 0 if all(outcome == "ok" for outcome in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
