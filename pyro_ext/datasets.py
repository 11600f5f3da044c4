"""Small real data sets that ship inside Python packages, as torch tensors.

Nothing here downloads: Mauna Loa CO2 comes from :mod:`statsmodels.datasets`, the handwritten
digits and the iris flowers from :mod:`sklearn.datasets`. Those packages belong to the
``tutorials`` extra (``pip install pyro_ext[tutorials]``); a loader whose package is missing raises
an :class:`ImportError` that says so.

Every loader returns tensors in :func:`torch.get_default_dtype` (class labels as ``torch.long``)
and is also reachable by name through :func:`load`::

    >>> from pyro_ext import datasets
    >>> co2 = datasets.load("co2", frequency="monthly", missing="interpolate")
    >>> co2.time.shape, co2.ppm.shape
    (torch.Size([526]), torch.Size([526]))
"""

from __future__ import annotations

import calendar
import importlib
import inspect
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

__all__ = ["CO2", "Digits", "Iris", "available", "co2", "digits", "iris", "load"]


class CO2(NamedTuple):
    """Mauna Loa atmospheric CO2.

    :ivar time: observation times in decimal years (``1958.24`` is late March 1958).
    :ivar ppm: CO2 mole fraction in parts per million; NaN marks a missing week when
        ``missing="keep"``.
    """

    time: torch.Tensor
    ppm: torch.Tensor


class Digits(NamedTuple):
    """sklearn's 8x8 handwritten digits (1797 images, pixel values 0..16 before scaling).

    :ivar images: ``[n, 64]`` (or ``[n, 8, 8]`` with ``as_images=True``).
    :ivar targets: ``[n]`` digit labels, ``torch.long``.
    """

    images: torch.Tensor
    targets: torch.Tensor


class Iris(NamedTuple):
    """Fisher's iris flowers (150 flowers, 4 measurements in cm, 3 species).

    :ivar features: ``[150, 4]`` sepal length, sepal width, petal length, petal width.
    :ivar targets: ``[150]`` species labels 0 (setosa), 1 (versicolor), 2 (virginica), ``torch.long``.
    """

    features: torch.Tensor
    targets: torch.Tensor


def _require(module: str, package: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError as error:
        raise ImportError(
            f"this data set needs the package {package!r}, which is part of pyro_ext's 'tutorials' extra: "
            "install it with `pip install 'pyro_ext[tutorials]'`"
        ) from error


def _choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")


def _decimal_year(dates: Any) -> np.ndarray:
    """Year plus the elapsed fraction of it at midnight starting each date (leap years counted)."""
    years = np.asarray(dates.year, dtype=np.int64)
    day_of_year = np.asarray(dates.day_of_year, dtype=np.float64)
    days_in_year = np.array([366.0 if calendar.isleap(int(y)) else 365.0 for y in years])
    return years + (day_of_year - 1.0) / days_in_year


def co2(
    *,
    frequency: Literal["weekly", "monthly"] = "weekly",
    missing: Literal["drop", "interpolate", "keep"] = "drop",
    start: float | None = None,
    end: float | None = None,
) -> CO2:
    """Mauna Loa CO2, weekly from 1958-03-29 to 2001-12-29 (``statsmodels.datasets.co2``).

    The weekly record has 2284 weeks, 59 of them missing. ``frequency="monthly"`` averages the
    observed weeks of each calendar month: 526 months, of which 5 (1958-06, 1958-10 and
    1964-02..04) have no observed week at all. Monthly times are mid-month,
    ``year + (month - 0.5) / 12``. How missing weeks (or months) are handled is explicit:

    - ``missing="drop"`` (default) removes them, so ``time`` has gaps (2225 weeks, 521 months);
    - ``missing="interpolate"`` fills each one linearly in time from its neighbours (every gap in
      this record is interior, so nothing is extrapolated);
    - ``missing="keep"`` keeps them as NaN in ``ppm``, for a model with a NaN policy.

    :param str frequency: ``"weekly"`` or ``"monthly"``.
    :param str missing: ``"drop"``, ``"interpolate"`` or ``"keep"``.
    :param float start: keep observations with ``time >= start`` (decimal years), if given.
    :param float end: keep observations with ``time < end`` (decimal years), if given.
    :returns: :class:`CO2` with ``time`` in decimal years and ``ppm``.
    """
    _choice("frequency", frequency, ("weekly", "monthly"))
    _choice("missing", missing, ("drop", "interpolate", "keep"))
    for name, bound in (("start", start), ("end", end)):
        if bound is not None and not (isinstance(bound, (int, float)) and np.isfinite(bound)):
            raise ValueError(f"{name} must be a finite number of decimal years; got {bound!r}")
    if start is not None and end is not None and not start < end:
        raise ValueError(f"start must be before end; got start={start!r}, end={end!r}")

    frame = _require("statsmodels.datasets.co2", "statsmodels").load_pandas().data
    if frequency == "monthly":
        monthly = frame["co2"].resample("MS").mean()
        # mid-month in decimal years, the convention of NOAA's monthly Mauna Loa record
        time = (
            np.asarray(monthly.index.year, dtype=np.float64) + (np.asarray(monthly.index.month) - 0.5) / 12.0
        )
        ppm = monthly.to_numpy(dtype=np.float64)
    else:
        time = _decimal_year(frame.index)
        ppm = frame["co2"].to_numpy(dtype=np.float64)
    gap = np.isnan(ppm)
    if missing == "drop":
        time, ppm = time[~gap], ppm[~gap]
    elif missing == "interpolate":
        ppm = ppm.copy()
        ppm[gap] = np.interp(time[gap], time[~gap], ppm[~gap])

    keep = np.ones_like(time, dtype=bool)
    if start is not None:
        keep &= time >= start
    if end is not None:
        keep &= time < end
    dtype = torch.get_default_dtype()
    return CO2(torch.as_tensor(time[keep], dtype=dtype), torch.as_tensor(ppm[keep], dtype=dtype))


def digits(
    *,
    scale: Literal["raw", "unit", "symmetric"] = "raw",
    as_images: bool = False,
    classes: tuple[int, ...] | None = None,
) -> Digits:
    """sklearn's 8x8 handwritten digits (1797 images, pixel values are integers 0..16).

    :param str scale: ``"raw"`` keeps 0..16; ``"unit"`` divides by 16 into [0, 1];
        ``"symmetric"`` maps to [-1, 1] (the range diffusion models are trained on).
    :param bool as_images: return ``images`` as ``[n, 8, 8]`` instead of ``[n, 64]``.
    :param tuple classes: keep only these digit labels (each in 0..9), if given.
    """
    _choice("scale", scale, ("raw", "unit", "symmetric"))
    if not isinstance(as_images, bool):
        raise TypeError(f"as_images must be a bool; got {type(as_images).__name__}")
    bunch = _require("sklearn.datasets", "scikit-learn").load_digits()
    images = np.asarray(bunch.data, dtype=np.float64)
    targets = np.asarray(bunch.target, dtype=np.int64)
    if classes is not None:
        wanted = tuple(classes)
        if not wanted or any(not isinstance(c, (int, np.integer)) or not 0 <= c <= 9 for c in wanted):
            raise ValueError(
                f"classes must be a non-empty collection of digit labels in 0..9; got {classes!r}"
            )
        keep = np.isin(targets, wanted)
        images, targets = images[keep], targets[keep]
    if scale == "unit":
        images = images / 16.0
    elif scale == "symmetric":
        images = images / 8.0 - 1.0
    tensor = torch.as_tensor(images, dtype=torch.get_default_dtype())
    if as_images:
        tensor = tensor.reshape(-1, 8, 8)
    return Digits(tensor, torch.as_tensor(targets))


def iris(*, standardize: bool = False) -> Iris:
    """Fisher's iris data (150 flowers, 4 measurements in cm, 3 species).

    :param bool standardize: centre each feature and divide by its standard deviation.
    """
    if not isinstance(standardize, bool):
        raise TypeError(f"standardize must be a bool; got {type(standardize).__name__}")
    bunch = _require("sklearn.datasets", "scikit-learn").load_iris()
    features = np.asarray(bunch.data, dtype=np.float64)
    if standardize:
        features = (features - features.mean(0)) / features.std(0)
    return Iris(
        torch.as_tensor(features, dtype=torch.get_default_dtype()),
        torch.as_tensor(np.asarray(bunch.target, dtype=np.int64)),
    )


_LOADERS: dict[str, Callable[..., Any]] = {"co2": co2, "digits": digits, "iris": iris}


def available() -> tuple[str, ...]:
    """The names :func:`load` accepts."""
    return tuple(sorted(_LOADERS))


def load(name: str, **options: Any) -> CO2 | Digits | Iris:
    """Load a bundled data set by name.

    :param str name: one of :func:`available` (``"co2"``, ``"digits"``, ``"iris"``).
    :param options: keyword options of that data set's loader (see :func:`co2`, :func:`digits`,
        :func:`iris`).
    :raises ValueError: for an unknown name or option; the message lists the valid choices.
    """
    if not isinstance(name, str) or name not in _LOADERS:
        raise ValueError(f"unknown data set name {name!r}; choose one of {', '.join(available())}")
    loader = _LOADERS[name]
    valid = tuple(inspect.signature(loader).parameters)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(map(repr, unknown))} for data set {name!r}; "
            f"valid options are {', '.join(valid) if valid else 'none'}"
        )
    return loader(**options)
