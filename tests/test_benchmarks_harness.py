import io
import json
import sys
import types

import pytest

import benchmarks.__main__ as cli
from benchmarks.harness import Measurement, format_table, time_pair, write_json


class FakeClock:
    """Each call to a timed function advances the clock by that function's fixed cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def work(self, seconds):
        def fn():
            self.now += seconds

        return fn


def test_time_pair_reports_medians_and_ratio():
    clock = FakeClock()
    costs = iter([5.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])  # one outlier among ours' calls
    ours_calls, anchor_calls = [], []

    def ours():
        ours_calls.append(1)
        clock.now += 3.0 if len(ours_calls) > 1 else 0.0  # the warmup call is not timed

    def anchor():
        anchor_calls.append(1)
        clock.now += next(costs) if len(anchor_calls) > 1 else 0.0

    m = time_pair("x", ours, anchor, repeats=5, warmup=1, timer=clock)
    assert len(ours_calls) == len(anchor_calls) == 6
    assert m.ours_s == 3.0 and m.anchor_s == 1.0  # the median drops the 5 s outlier
    assert m.ratio == 3.0


def test_time_pair_rejects_bad_repeats():
    with pytest.raises(ValueError, match="repeats"):
        time_pair("x", lambda: None, lambda: None, repeats=0)
    with pytest.raises(ValueError, match="warmup"):
        time_pair("x", lambda: None, lambda: None, warmup=-1)


def test_table_and_json(tmp_path):
    rows = [Measurement("small", 0.002, 0.001, 3, {"n": 10}), Measurement("large", 0.5, 1.0, 3)]
    table = format_table(rows)
    assert "ratio" in table.splitlines()[0]
    assert "2.000" in table and "0.500" in table and "n=10" in table
    path = tmp_path / "out.json"
    log = io.StringIO()
    write_json(str(path), "demo", rows, out=log)
    assert str(path) in log.getvalue()
    payload = json.loads(path.read_text())
    assert payload["benchmark"] == "demo"
    assert [m["ratio"] for m in payload["measurements"]] == [2.0, 0.5]
    assert payload["environment"]["torch"]


def test_cli_runs_a_named_benchmark(monkeypatch, capsys, tmp_path):
    clock = FakeClock()
    module = types.ModuleType("benchmarks.fake")
    module.run = lambda quick=False: [
        time_pair("fake", clock.work(2.0), clock.work(1.0), repeats=3, timer=clock)
    ]
    monkeypatch.setitem(sys.modules, "benchmarks.fake", module)
    monkeypatch.setattr(cli, "available", lambda: ["fake"])
    assert cli.main(["fake", "--quick", "--json", str(tmp_path / "f.json")]) == 0
    out = capsys.readouterr().out
    assert "fake" in out and "2.000" in out
    assert json.loads((tmp_path / "f.json").read_text())["measurements"][0]["ratio"] == 2.0
    with pytest.raises(SystemExit):
        cli.main(["nope"])


def test_every_benchmark_module_defines_run():
    import importlib

    for name in cli.available():
        module = importlib.import_module(f"benchmarks.{name}")
        assert callable(getattr(module, "run", None)), f"benchmarks/{name} has no run(quick=False)"
