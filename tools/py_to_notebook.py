"""Convert a percent-format script (``# %%`` code cells, ``# %% [markdown]`` text cells) to a notebook.

Usage: ``python tools/py_to_notebook.py SCRIPT.py tutorials/NAME.ipynb [--execute]``.
``--execute`` runs it top to bottom (full mode unless ``CI`` is set) and stores the outputs, so a
reader sees the plots without running anything.
"""

from __future__ import annotations

import argparse
import pathlib
import re

import nbformat


def convert(source: str) -> nbformat.NotebookNode:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.metadata["language_info"] = {"name": "python"}
    chunks = re.split(r"^# %%(.*)$", source, flags=re.MULTILINE)
    for header, body in zip(chunks[1::2], chunks[2::2]):
        body = body.strip("\n")
        if "[markdown]" in header:
            text = "\n".join(
                line[2:] if line.startswith("# ") else line.lstrip("#") for line in body.splitlines()
            )
            notebook.cells.append(nbformat.v4.new_markdown_cell(text))
        elif body.strip():
            notebook.cells.append(nbformat.v4.new_code_cell(body))
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("script")
    parser.add_argument("notebook")
    parser.add_argument("--execute", action="store_true")
    args = parser.parse_args()
    notebook = convert(pathlib.Path(args.script).read_text())
    target = pathlib.Path(args.notebook)
    if args.execute:
        from nbclient import NotebookClient

        NotebookClient(notebook, timeout=3600, resources={"metadata": {"path": str(target.parent)}}).execute()
    nbformat.write(notebook, target)
    print(f"wrote {target} ({len(notebook.cells)} cells)")


if __name__ == "__main__":
    main()
