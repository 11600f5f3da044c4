"""The main demo: ``python -m pyro_ext.demo`` tours every implemented part on real or realistic data.

Each part adds one module to this package defining ``TITLE`` (a line), ``ORDER`` (an int, the
tour's order) and ``run(context: DemoContext) -> None``. Sections are discovered, so adding a part
touches no other file. The demo prints its figures and writes its plots to the folder it names.
"""

from pyro_ext.demo._runner import DemoContext, available_sections, main, run_sections

__all__ = ["DemoContext", "available_sections", "main", "run_sections"]
