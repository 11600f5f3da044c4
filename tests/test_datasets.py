import math

import pytest
import torch

from pyro_ext import datasets


class TestCO2:
    def test_weekly_record_and_gaps(self):
        kept = datasets.co2(missing="keep")
        assert kept.time.shape == kept.ppm.shape == (2284,)
        assert int(kept.ppm.isnan().sum()) == 59  # documented by statsmodels' co2 description
        dropped = datasets.co2()
        assert dropped.time.shape == (2284 - 59,)
        assert not dropped.ppm.isnan().any()
        filled = datasets.co2(missing="interpolate")
        assert torch.equal(filled.time, kept.time)
        observed = ~kept.ppm.isnan()
        assert torch.equal(filled.ppm[observed], kept.ppm[observed])

    def test_interpolated_weeks_lie_between_neighbours(self):
        kept = datasets.co2(missing="keep")
        filled = datasets.co2(missing="interpolate")
        for i in torch.nonzero(kept.ppm.isnan()).flatten().tolist():
            before = kept.ppm[:i][~kept.ppm[:i].isnan()][-1]
            after = kept.ppm[i + 1 :][~kept.ppm[i + 1 :].isnan()][0]
            assert min(before, after) <= filled.ppm[i] <= max(before, after)

    def test_decimal_years_and_units(self):
        data = datasets.co2()
        # 1958-03-29 is day 88 of a 365-day year
        assert data.time[0].item() == pytest.approx(1958 + 87 / 365, abs=1e-12)
        assert data.time[-1].item() == pytest.approx(2001 + 362 / 365, abs=1e-12)
        assert (data.time.diff() > 0).all()
        # weekly sampling: 7 days is 7/365 or 7/366 of a year, wider steps only across gaps
        assert data.time.diff().min().item() == pytest.approx(7 / 366, rel=0.01)
        assert 310 < data.ppm.min() < 320 and 365 < data.ppm.max() < 375

    def test_monthly(self):
        monthly = datasets.co2(frequency="monthly", missing="keep")
        assert monthly.time.shape == (526,)
        assert int(monthly.ppm.isnan().sum()) == 5
        assert monthly.time[0].item() == pytest.approx(1958 + 2.5 / 12)
        weekly = datasets.co2()
        march_1958 = (weekly.time >= 1958 + 2 / 12) & (weekly.time < 1958 + 3 / 12)
        assert monthly.ppm[0].item() == pytest.approx(weekly.ppm[march_1958].mean().item())

    def test_window(self):
        data = datasets.co2(start=1970, end=1990.5)
        assert data.time.min() >= 1970 and data.time.max() < 1990.5

    def test_default_dtype(self):
        torch.set_default_dtype(torch.float32)
        assert datasets.co2().ppm.dtype == torch.float32
        torch.set_default_dtype(torch.float64)
        assert datasets.co2().ppm.dtype == torch.float64

    @pytest.mark.parametrize(
        "options, argument",
        [
            ({"frequency": "daily"}, "frequency"),
            ({"missing": "zero"}, "missing"),
            ({"start": math.nan}, "start"),
            ({"start": 1990, "end": 1980}, "start"),
        ],
    )
    def test_bad_options(self, options, argument):
        with pytest.raises(ValueError, match=argument):
            datasets.co2(**options)


class TestDigits:
    def test_shapes_and_scales(self):
        raw = datasets.digits()
        assert raw.images.shape == (1797, 64) and raw.targets.shape == (1797,)
        assert raw.targets.dtype == torch.long and raw.images.dtype == torch.float64
        assert raw.images.min() == 0 and raw.images.max() == 16
        unit = datasets.digits(scale="unit")
        assert torch.allclose(unit.images, raw.images / 16)
        symmetric = datasets.digits(scale="symmetric")
        assert symmetric.images.min() == -1 and symmetric.images.max() == 1
        assert datasets.digits(as_images=True).images.shape == (1797, 8, 8)

    def test_classes(self):
        subset = datasets.digits(classes=(0, 7))
        assert set(subset.targets.tolist()) == {0, 7}
        with pytest.raises(ValueError, match="classes"):
            datasets.digits(classes=(10,))


class TestIris:
    def test_iris(self):
        data = datasets.iris()
        assert data.features.shape == (150, 4) and torch.equal(
            data.targets.bincount(), torch.tensor([50, 50, 50])
        )
        standard = datasets.iris(standardize=True)
        assert torch.allclose(standard.features.mean(0), torch.zeros(4), atol=1e-12)
        assert torch.allclose(standard.features.std(0, unbiased=False), torch.ones(4))


class TestLoad:
    def test_load_by_name_passes_options(self):
        assert datasets.load("digits", classes=(3,)).targets.unique().tolist() == [3]
        assert datasets.load("co2", frequency="monthly").time.shape == (521,)

    def test_unknown_name_lists_choices(self):
        with pytest.raises(ValueError, match="co2, digits, iris"):
            datasets.load("mnist")

    def test_unknown_option_lists_valid_options(self):
        with pytest.raises(ValueError, match="frequency, missing, start, end"):
            datasets.load("co2", freq="weekly")
        with pytest.raises(ValueError, match="standardize"):
            datasets.load("iris", normalise=True)

    def test_missing_package_names_the_extra(self, monkeypatch):
        import builtins

        real_import = builtins.__import__

        def refuse_sklearn(name, *args, **kwargs):
            if name.startswith("sklearn"):
                raise ImportError("No module named 'sklearn'")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", refuse_sklearn)
        monkeypatch.delitem(__import__("sys").modules, "sklearn.datasets", raising=False)
        with pytest.raises(ImportError, match="tutorials"):
            datasets.iris()
