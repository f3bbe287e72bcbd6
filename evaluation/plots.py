"""Bar charts shared by every evaluation and the report (matplotlib, Agg backend, written atomically).

- `bar_chart(values, path, ...)`: one bar per key (e.g. EM per locale), optionally sorted, with
  error bars and a dashed line at the mean.
- `grouped_bar_chart(groups, path, ...)`: several series side by side per key (e.g. ICL accuracy for
  k = 0, 1, 5 per locale; chrF++ en->xx and xx->en per language).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from core.fsutil import atomic_write_bytes


def _pyplot():
    import matplotlib

    # Headless: no display on training nodes or CI.
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    _pyplot().close(fig)
    return atomic_write_bytes(path, buffer.getvalue())


def _auto_ylim(values: Sequence[float]) -> tuple[float, float]:
    """From 0 (or the lowest negative value) to 15% above the highest; (0, 1) when all are 0."""
    low = min([0.0, *values])
    high = max([0.0, *values])
    return (low * 1.15, high * 1.15 if high > 0 else 1.0)


def _width(num_bars: int) -> float:
    return min(max(4.0, 0.32 * num_bars + 1.5), 24.0)


def bar_chart(
    values: Mapping[str, float],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
    errors: Mapping[str, tuple[float, float]] | None = None,
    mean: float | None = None,
    mean_label: str = "mean",
    sort: bool = True,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """One bar per key; `errors` maps a key to its (low, high) interval; `mean` draws a dashed line.

    With `sort`, bars go from highest to lowest value. Returns the written path.
    """
    plt = _pyplot()
    keys = list(values)
    if sort:
        keys.sort(key=lambda k: values[k], reverse=True)
    heights = [values[k] for k in keys]
    fig, ax = plt.subplots(figsize=(_width(len(keys)), 4.0))
    yerr = None
    if errors:
        # matplotlib wants distances below and above the bar, shape [2, N].
        yerr = [
            [max(0.0, values[k] - errors[k][0]) if k in errors else 0.0 for k in keys],
            [max(0.0, errors[k][1] - values[k]) if k in errors else 0.0 for k in keys],
        ]
    ax.bar(range(len(keys)), heights, yerr=yerr, capsize=2, color="#4C72B0")
    if mean is not None:
        ax.axhline(mean, color="#C44E52", linestyle="--", linewidth=1.2, label=f"{mean_label} = {mean:.3f}")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=60 if len(keys) > 6 else 0, ha="right" if len(keys) > 6 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    upper = [errors[k][1] for k in keys if k in errors] if errors else []
    ax.set_ylim(*(ylim or _auto_ylim(heights + upper + ([mean] if mean is not None else []))))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def grouped_bar_chart(
    groups: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    title: str,
    ylabel: str,
    series_order: Sequence[str] | None = None,
    hlines: Mapping[str, float] | None = None,
    ylim: tuple[float, float] | None = None,
) -> Path:
    """`groups[key][series] = value`: one cluster of bars per key, one colour per series.

    `hlines` draws labelled dotted reference lines (e.g. {"chance": 1/60}). Missing values are
    left out of their cluster. Returns the written path.
    """
    plt = _pyplot()
    keys = list(groups)
    series = list(series_order) if series_order is not None else sorted({s for g in groups.values() for s in g})
    num_series = max(1, len(series))
    bar_width = 0.8 / num_series
    fig, ax = plt.subplots(figsize=(_width(len(keys) * num_series * 0.6 + 2), 4.0))
    for i, name in enumerate(series):
        xs = [j + (i - (num_series - 1) / 2) * bar_width for j, k in enumerate(keys) if name in groups[k]]
        ys = [groups[k][name] for k in keys if name in groups[k]]
        ax.bar(xs, ys, width=bar_width, label=name)
    for label, y in (hlines or {}).items():
        ax.axhline(y, color="grey", linestyle=":", linewidth=1.0)
        ax.annotate(label, xy=(1.0, y), xycoords=("axes fraction", "data"), fontsize=7, color="grey", va="bottom", ha="right")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=60 if len(keys) > 6 else 0, ha="right" if len(keys) > 6 else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.set_ylim(*(ylim or _auto_ylim([v for g in groups.values() for v in g.values()] + list((hlines or {}).values()))))
    # Beside the axes: inside, it covers the last cluster (the mean) once there are many series.
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
