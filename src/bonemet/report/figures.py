"""The report's own figures (drawn from the stages' tables) and PNG files, as inline data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: Colours of the two classes in every cohort figure.
CLASS_COLORS = {0: "#4c72b0", 1: "#dd8452"}
CLASS_NAMES = {0: "other origin (0)", 1: "breast origin (1)"}


def figure_uri(fig: Figure, dpi: int) -> str:
    """A matplotlib figure as a ``data:image/png;base64`` URI (the figure is closed)."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def file_uri(path: str | Path) -> str | None:
    """A PNG file as a data URI, or None when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return None
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def by_class_histograms(panels: Sequence[tuple[str, Mapping[int, Sequence[float]]]], title: str) -> Figure:
    """One histogram panel per ``(x label, {label: values})``, the two classes overlaid."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for ax, (xlabel, groups) in zip(axes[0], panels, strict=True):
        values = [v for vs in groups.values() for v in vs if np.isfinite(v)]
        bins = np.histogram_bin_edges(values, bins=15) if values else 10
        for label, vs in sorted(groups.items()):
            finite = [v for v in vs if np.isfinite(v)]
            if finite:
                ax.hist(finite, bins=bins, alpha=0.6, color=CLASS_COLORS.get(label), label=CLASS_NAMES.get(label, label))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cases")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def icc_histogram(icc: Sequence[float], threshold: float, form: str) -> Figure:
    """The distribution of every feature's ICC (automatic vs manual masks) with the filter's threshold."""
    import matplotlib.pyplot as plt

    values = np.asarray([v for v in icc if np.isfinite(v)], dtype=float)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(np.clip(values, -1, 1), bins=40, range=(min(-0.2, float(values.min()) if len(values) else 0), 1.0),
            color="#8172b3")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:g}")
    kept = int((values >= threshold).sum())
    ax.set_xlabel(f"{form} between automatic- and manual-mask feature values")
    ax.set_ylabel("features")
    ax.set_title(f"{kept} of {len(values)} features at or above the threshold", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def fold_boxplots(table: Any, columns: Sequence[tuple[str, str]]) -> Figure:
    """Per-fold box plots of the segmentation's per-case metrics (``columns``: (column, axis label))."""
    import matplotlib.pyplot as plt

    folds = sorted(table["fold"].unique())
    fig, axes = plt.subplots(1, len(columns), figsize=(3.8 * len(columns), 3.0), squeeze=False)
    for ax, (column, label) in zip(axes[0], columns, strict=True):
        data = [table.loc[table["fold"] == f, column].dropna().to_numpy() for f in folds]
        ax.boxplot(data, tick_labels=[str(f) for f in folds])
        ax.set_xlabel("fold")
        ax.set_ylabel(label)
    fig.tight_layout()
    return fig
