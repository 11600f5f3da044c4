"""Demo section: the bundled real data the tutorials use."""

from __future__ import annotations

from pyro_ext import datasets
from pyro_ext.demo._runner import DemoContext

TITLE = "Bundled real data: Mauna Loa CO2, handwritten digits, iris"
ORDER = 0


def run(context: DemoContext) -> None:
    import matplotlib.pyplot as plt

    weekly = datasets.co2(missing="keep")
    observed = ~weekly.ppm.isnan()
    context.report("co2 weeks", int(weekly.ppm.numel()))
    context.report("co2 missing weeks", int((~observed).sum()))
    context.report(
        "co2 rise 1958-2001",
        float(weekly.ppm[observed][-52:].mean() - weekly.ppm[observed][:52].mean()),
        "ppm",
    )
    digits = datasets.digits(as_images=True)
    iris = datasets.iris()
    context.report("digits", tuple(digits.images.shape))
    context.report("iris", tuple(iris.features.shape))

    figure, axes = plt.subplots(1, 3, figsize=(13, 3.2), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    axes[0].plot(weekly.time, weekly.ppm, lw=0.7)
    gaps = weekly.time[~observed]
    axes[0].plot(gaps, [312.0] * len(gaps), "|", color="C3", label="missing week")
    axes[0].set(xlabel="year", ylabel="CO2 [ppm]", title="Mauna Loa, weekly")
    axes[0].legend(loc="upper left")
    grid = digits.images[:16].reshape(4, 4, 8, 8).permute(0, 2, 1, 3).reshape(32, 32)
    axes[1].imshow(grid, cmap="gray_r")
    axes[1].set(title="sklearn digits", xticks=[], yticks=[])
    axes[2].scatter(iris.features[:, 2], iris.features[:, 3], c=iris.targets, s=8, cmap="viridis")
    axes[2].set(xlabel="petal length [cm]", ylabel="petal width [cm]", title="iris")
    context.savefig(figure, "overview")
