"""What every figure of the report shares: one style, atomic PNG writes, readable log axes."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, never a window: stages run headless
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from medkd.util.files import atomic_write  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")


def save_figure(fig, path: Path) -> None:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)


def log_x_axis(ax) -> None:
    """A log x axis labelled in plain numbers at 1, 2, 3, 5 x 10^k, all in one font size and each with its
    grid line (matplotlib's default labels only the powers of ten, so a 5-70 ms range shows one label)."""
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 3.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
