import os
import pathlib
import subprocess
import sys

import pytest

from pyro_ext.demo import DemoContext, available_sections, run_sections

ROOT = pathlib.Path(__file__).parents[1]


def test_sections_declare_title_order_and_run():
    sections = available_sections()
    assert sections and sections[0].__name__.endswith(".datasets")
    for module in sections:
        assert isinstance(module.TITLE, str) and isinstance(module.ORDER, int) and callable(module.run)


def test_unknown_section_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown demo section"):
        run_sections(DemoContext(tmp_path), only=["nope"])


def test_demo_runs_to_the_end_in_smoke_mode(tmp_path):
    """The README's demo command, at smoke size, in a fresh interpreter."""
    env = {
        **os.environ,
        "CI": "true",
        "MPLBACKEND": "Agg",
        "TQDM_DISABLE": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pyro_ext.demo", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "summary" in result.stdout and "failed" not in result.stdout
    assert sorted(path.suffix for path in tmp_path.iterdir()) and all(
        path.suffix == ".png" for path in tmp_path.iterdir()
    )
