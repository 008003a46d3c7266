"""What people look at: per-image explanation panels and a self-contained HTML gallery.

Figures are drawn with matplotlib's object API on an Agg canvas (no pyplot state), so this is
safe to call from worker threads (the web app) and on headless machines.
"""

from __future__ import annotations

import base64
import html
import io
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from polypseg.core.io_utils import atomic_write_text, display_name

HEATMAP_CMAP = "jet"  # the Grad-CAM convention; readers compare with the paper's figures
GROUPS = ("best", "median", "worst")


def render_panel(
    image: np.ndarray,
    heatmap: np.ndarray,
    prediction: np.ndarray,
    ground_truth: np.ndarray | None = None,
    title: str | None = None,
    alpha: float = 0.5,
) -> bytes:
    """PNG bytes of one row: image | ground truth (if any) | prediction contour | heatmap overlay with colour bar.

    All arrays at the same ``(H, W)``: ``image`` RGB ``uint8``, ``heatmap`` in [0, 1],
    ``prediction`` and ``ground_truth`` bool.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    height, width = image.shape[:2]
    columns = 4 if ground_truth is not None else 3
    aspect = width / max(height, 1)
    figure = Figure(figsize=(3.0 * aspect * columns + 0.6, 3.3), dpi=110, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, columns)
    for ax in axes:
        ax.set_axis_off()
    axes[0].imshow(image)
    axes[0].set_title("image", fontsize=9)
    col = 1
    if ground_truth is not None:
        axes[col].imshow(image)
        axes[col].imshow(np.ma.masked_where(~ground_truth, ground_truth), cmap="summer", alpha=0.45, vmin=0, vmax=1)
        _contour(axes[col], ground_truth, "lime")
        axes[col].set_title("ground truth", fontsize=9)
        col += 1
    axes[col].imshow(image)
    _contour(axes[col], prediction, "yellow")
    if ground_truth is not None:
        _contour(axes[col], ground_truth, "lime", linestyle="--")
    axes[col].set_title("prediction" + (" (gt dashed)" if ground_truth is not None else ""), fontsize=9)
    col += 1
    axes[col].imshow(image)
    axes[col].imshow(np.clip(heatmap, 0, 1), cmap=HEATMAP_CMAP, alpha=alpha, vmin=0, vmax=1)
    axes[col].set_title("Grad-CAM", fontsize=9)
    # an opaque colour bar: the overlay's alpha would wash it out
    scale = ScalarMappable(norm=Normalize(0, 1), cmap=HEATMAP_CMAP)
    figure.colorbar(scale, ax=axes[col], fraction=0.046, pad=0.02)
    if title:
        figure.suptitle(display_name(title), fontsize=9)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # a title in a script the font lacks (a CJK file name) is drawn with boxes, not warned about
        warnings.filterwarnings("ignore", message=r"(?s).*Glyph .* missing from")
        warnings.filterwarnings("ignore", message=r"(?s).*[Mm]atplotlib currently does not support")
        figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _contour(ax: Any, mask: np.ndarray, color: str, linestyle: str = "-") -> None:
    mask = np.asarray(mask, dtype=bool)
    if mask.any() and not mask.all():  # matplotlib warns on a constant field
        ax.contour(mask.astype(np.float32), levels=[0.5], colors=[color], linewidths=1.2, linestyles=linestyle)


def select_cases(scores: Sequence[float], stems: Sequence[str], n: int) -> dict[str, list[int]]:
    """Indices of the ``n`` best, ``n`` median and ``n`` worst of ``scores``: the one case selection.

    Non-finite scores are left out; no index is chosen twice. Ranks are by score, ties broken
    by stem (of equal scores, the smaller stem counts as the lower). With fewer than ``3 n`` scores the worst are taken first, then the best, then the
    median ones (nearest the middle first). Each group lists its extreme first: ``best`` from the
    highest, ``worst`` from the lowest, ``median`` from the highest of its own. All three keys
    are always present.
    """
    finite = [i for i in range(len(scores)) if _finite(scores[i])]
    ranked = sorted(finite, key=lambda i: (float(scores[i]), stems[i]))[::-1]  # best first
    middle = len(ranked) // 2
    candidates = {
        "worst": range(len(ranked) - 1, -1, -1),
        "best": range(len(ranked)),
        # outwards from the middle: m, m-1, m+1, m-2, ...
        "median": [middle + (i + 1) // 2 * (-1 if i % 2 else 1) for i in range(len(ranked))],
    }
    taken: set[int] = set()
    chosen: dict[str, list[int]] = {}
    for name in ("worst", "best", "median"):
        picks: list[int] = []
        for rank in candidates[name]:
            if len(picks) == n:
                break
            if 0 <= rank < len(ranked) and rank not in taken:
                taken.add(rank)
                picks.append(rank)
        chosen[name] = picks
    chosen["median"].sort()
    return {name: [ranked[rank] for rank in chosen[name]] for name in GROUPS}


def select_records(
    records: Sequence[Mapping[str, Any]], per_group: int = 3, key: str = "dice"
) -> dict[str, list[Mapping[str, Any]]]:
    """:func:`select_cases` over records by ``key``: the non-empty groups, or ``{"all": ...}`` when no record has it."""
    scores = [float(r[key]) if _finite(r.get(key)) else float("nan") for r in records]
    if not any(_finite(v) for v in scores):
        return {"all": list(records[: 3 * per_group])}
    groups = select_cases(scores, [str(r.get("stem", "")) for r in records], per_group)
    return {name: [records[i] for i in indices] for name, indices in groups.items() if indices}


def _finite(value: Any) -> bool:
    try:
        return value is not None and math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _format(value: Any) -> str:
    if isinstance(value, float):
        return "–" if not math.isfinite(value) else f"{value:.3f}"
    return html.escape(display_name(str(value)))


def render_gallery(
    groups: Mapping[str, Sequence[Mapping[str, Any]]],
    panels: Mapping[str, bytes],
    title: str = "polypseg explanations",
    summary: Mapping[str, Mapping[str, float]] | None = None,
    notes: Sequence[str] = (),
    columns: Sequence[str] = ("dice", "energy_inside", "pointing_game", "topk_iou", "deletion_auc", "insertion_auc"),
) -> str:
    """A self-contained HTML page: every panel is an embedded base64 PNG, no external assets."""
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}"
        "h2{border-bottom:1px solid #ccc;padding-bottom:.2rem}figure{margin:0 0 1.4rem 0}"
        "img{max-width:100%;height:auto;border:1px solid #ddd}table{border-collapse:collapse;font-size:.9rem}"
        "td,th{padding:.15rem .6rem;text-align:right}td:first-child,th:first-child{text-align:left}"
        "figcaption{font-size:.85rem;color:#444}.note{color:#666;font-size:.9rem}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
    ]
    parts += [f"<p class='note'>{html.escape(display_name(note))}</p>" for note in notes]
    if summary:
        parts.append("<table><tr><th>metric</th><th>mean</th><th>std</th><th>n</th></tr>")
        for name, stats in summary.items():
            parts.append(
                f"<tr><td>{html.escape(name)}</td><td>{_format(float(stats['mean']))}</td>"
                f"<td>{_format(float(stats['std']))}</td><td>{int(stats.get('n', 0))}</td></tr>"
            )
        parts.append("</table>")
    headings = {
        "best": "Best cases (highest Dice)",
        "median": "Median cases",
        "worst": "Worst cases (lowest Dice)",
        "all": "Cases (no ground truth: not ranked)",
    }
    for name, records in groups.items():
        parts.append(f"<h2>{html.escape(headings.get(name, name))}</h2>")
        for record in records:
            key = str(record["stem"])
            png = panels.get(key)
            stem = display_name(key)
            caption = ", ".join(f"{c} {_format(record[c])}" for c in columns if c in record)
            parts.append("<figure>")
            if png is not None:
                data = base64.b64encode(png).decode("ascii")
                parts.append(f"<img alt='{html.escape(stem)}' src='data:image/png;base64,{data}'>")
            parts.append(f"<figcaption><b>{html.escape(stem)}</b> — {caption}</figcaption></figure>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_gallery(
    path: Path | str,
    records: Sequence[Mapping[str, Any]],
    panels: Mapping[str, Path | bytes],
    per_group: int = 3,
    title: str = "polypseg explanations",
    summary: Mapping[str, Mapping[str, float]] | None = None,
    notes: Sequence[str] = (),
) -> Path:
    """Select best/median/worst records by Dice and write the gallery page; returns its path.

    ``panels`` maps each stem to its panel PNG (bytes or a file path).
    """
    groups = select_records(records, per_group)
    wanted = {str(r["stem"]) for group in groups.values() for r in group}
    loaded = {
        stem: (value if isinstance(value, bytes) else Path(value).read_bytes())
        for stem, value in panels.items()
        if stem in wanted
    }
    path = Path(path)
    atomic_write_text(path, render_gallery(groups, loaded, title, summary, notes))
    return path
