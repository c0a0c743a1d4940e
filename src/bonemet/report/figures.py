"""The report's own figures (drawn from the stages' tables) and PNG files, as inline data URIs."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bonemet.data.manifest import LABEL_NAMES

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.figure import Figure

#: Colours of the two classes in every cohort figure.
CLASS_COLORS = {0: "#4c72b0", 1: "#dd8452"}


def class_name(label: int) -> str:
    """A label as the cohort figures and tables name it: ``breast origin (1)``."""
    return f"{LABEL_NAMES[label]} origin ({label})" if label in LABEL_NAMES else str(label)


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
                ax.hist(finite, bins=bins, alpha=0.6, color=CLASS_COLORS.get(label), label=class_name(label))
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


def _percentile_curve(percentiles: Mapping[str, float]) -> tuple[list[float], list[float]]:
    """``(HU values, percentiles)`` from plan.json's ``{"p0_5": hu, "p50": hu, ...}``, in order."""
    points = sorted((float(k[1:].replace("_", ".")), float(v)) for k, v in percentiles.items()
                    if k.startswith("p") and v is not None)
    return [v for _, v in points], [p for p, _ in points]


def plan_fingerprint(plan: Mapping[str, Any]) -> Figure:
    """The cohort's fingerprint (``plan.json``) in three panels, with what was planned from it marked:
    the voxel spacing per axis (the planned grid dashed), the lesions' largest extent (the typical
    extent and the crop's field of view), and the pooled HU percentiles of the lesion and bone-region
    voxels (the planned window shaded, the bone threshold dotted)."""
    import matplotlib.pyplot as plt

    fingerprint = plan.get("fingerprint") or {}
    cases = fingerprint.get("cases") or []
    values = {k: (v or {}).get("value") for k, v in (plan.get("values") or {}).items()}
    details, inputs = plan.get("details") or {}, plan.get("inputs") or {}
    fig, axes = plt.subplots(1, 3, figsize=(13.5, 3.3))
    colors = ("#4c72b0", "#55a868", "#c44e52")

    ax = axes[0]
    spacings = np.asarray([c["spacing_mm"] for c in cases if c.get("spacing_mm")], dtype=float).reshape(-1, 3)
    grid = values.get("preprocess.target_spacing_mm")
    finite = spacings[np.isfinite(spacings)]
    bins = np.histogram_bin_edges(finite, bins=20) if finite.size else 10
    for i, axis in enumerate("xyz"):
        ax.hist(spacings[:, i], bins=bins, alpha=0.5, color=colors[i], label=f"{axis}")
        if isinstance(grid, list | tuple) and len(grid) == 3:
            ax.axvline(float(grid[i]), color=colors[i], linestyle="--", linewidth=1.5)
    ax.set_xlabel("voxel spacing (mm); planned grid dashed")
    ax.set_ylabel("cases")
    ax.legend(fontsize=7, title="axis", title_fontsize=7)

    ax = axes[1]
    extents = [max(c["lesion_extent_mm"]) for c in cases if c.get("lesion_extent_mm") and max(c["lesion_extent_mm"]) > 0]
    ax.hist(extents, bins=20, color="#8172b3", alpha=0.8)
    for key, style, label in (("typical_lesion_extent_mm", ":", "typical lesion"),
                              ("field_of_view_mm", "--", "crop field of view")):
        if details.get(key) is not None:
            ax.axvline(float(details[key]), color="black", linestyle=style, label=f"{label} {float(details[key]):.0f} mm")
    ax.set_xlabel("lesion's largest extent (mm)")
    ax.set_ylabel("cases")
    ax.legend(fontsize=7)

    ax = axes[2]
    for key, color, label in (("hu_lesion", "#dd8452", "lesion voxels"), ("hu_bone_region", "#4c72b0", "bone region")):
        hu, pct = _percentile_curve(fingerprint.get(key) or {})
        if hu:
            ax.plot(hu, pct, marker="o", markersize=3, color=color, label=label)
    window = values.get("preprocess.hu_window")
    if isinstance(window, list | tuple) and len(window) == 2:
        ax.axvspan(float(window[0]), float(window[1]), color="#cccccc", alpha=0.5,
                   label=f"planned window {float(window[0]):.0f} to {float(window[1]):.0f} HU")
    if inputs.get("bone_threshold_hu") is not None:
        ax.axvline(float(inputs["bone_threshold_hu"]), color="black", linestyle=":", linewidth=1,
                   label=f"bone threshold {float(inputs['bone_threshold_hu']):.0f} HU")
    ax.set_xlabel("HU (pooled voxel samples)")
    ax.set_ylabel("percentile")
    ax.legend(fontsize=7)
    fig.suptitle(f"Cohort fingerprint ({fingerprint.get('n_cases', len(cases))} cases) and what was planned from it",
                 fontsize=10)
    fig.tight_layout()
    return fig
