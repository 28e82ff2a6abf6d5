"""One figure style for every notebook, and ``savefig`` to ``figures/<notebook>/<name>.png|pdf``.

    from kvlab import plotting
    plotting.use_style()                      # once, at the top of a notebook
    fig, ax = plt.subplots()
    plotting.heatmap(ax, energy, cbar_label="energy in top-8 dims")   # (layers, kv heads) map
    plotting.savefig(fig, "energy_top8")      # -> figures/01_kv_spectra/energy_top8.png (+ .pdf)

Where figures go is decided by :func:`kvlab.report.figures_dir` and :func:`kvlab.report.notebook_name`
(``$KVLAB_FIGURES_DIR``/``$KVLAB_NOTEBOOK`` when the report runner executes the notebook; the repo's
``figures/`` and the ``notebook=`` argument when run by hand). Importing this module changes nothing:
the style is applied only by :func:`use_style`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from kvlab.atomic import atomic_path
from kvlab.report import check_name, figures_dir, notebook_name

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from matplotlib.image import AxesImage

__all__ = ["STYLE_RC", "budget_axis", "heatmap", "savefig", "use_style"]

FIGURE_FORMATS = ("png", "pdf")

STYLE_RC: dict[str, Any] = {
    "figure.figsize": (6.4, 4.0),
    "figure.dpi": 110,  # on screen / inline in notebooks
    "savefig.dpi": 160,  # PNG files
    "savefig.bbox": "tight",
    "font.size": 11,
    "axes.titlesize": 12,
    "axes.labelsize": 11,
    "xtick.labelsize": 10,
    "ytick.labelsize": 10,
    "legend.fontsize": 10,
    "legend.frameon": False,
    "axes.grid": True,
    "grid.alpha": 0.35,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "image.cmap": "viridis",
    "pdf.fonttype": 42,  # embed TrueType fonts: text stays editable/searchable in the PDF
    "ps.fonttype": 42,
}


def use_style(context: str = "notebook", *, font_scale: float = 1.0) -> None:
    """Apply the kvlab style: seaborn's ``whitegrid`` theme, colour-blind palette, :data:`STYLE_RC`."""
    import seaborn as sns

    sns.set_theme(context=context, style="whitegrid", palette="colorblind", font_scale=font_scale,
                  rc=STYLE_RC)


def savefig(fig: Figure, name: str, *, notebook: str | None = None) -> Path:
    """Save ``fig`` as ``<figures dir>/<notebook>/<name>.png`` and ``.pdf``; return the PNG path.

    ``name`` is a file stem such as ``"energy_top8"`` (a trailing ``.png``/``.pdf`` is dropped).
    ``notebook`` is needed only outside the report runner, see :func:`kvlab.report.notebook_name`.
    """
    if name.endswith((".png", ".pdf")):
        name = name[:-4]
    check_name(name, "figure name")
    folder = figures_dir() / notebook_name(notebook)
    folder.mkdir(parents=True, exist_ok=True)
    for fmt in FIGURE_FORMATS:
        # CreationDate=None keeps PDFs byte-identical across runs
        metadata = {"CreationDate": None} if fmt == "pdf" else None
        with atomic_path(folder / f"{name}.{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, bbox_inches="tight", metadata=metadata)
    return folder / f"{name}.png"


def _as_matrix(matrix: Any) -> Any:
    import numpy as np

    if hasattr(matrix, "detach"):  # torch.Tensor
        matrix = matrix.detach().float().cpu().numpy()
    data = np.asarray(matrix, dtype=float)
    if data.ndim != 2:
        raise ValueError(f"heatmap needs a 2-D (rows, columns) matrix, got shape {data.shape}")
    return data


def heatmap(
    ax: Axes,
    matrix: Any,
    xlabel: str = "KV head",
    ylabel: str = "layer",
    cbar_label: str = "",
    *,
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
) -> AxesImage:
    """Draw a (rows, columns) matrix, e.g. (layer, kv head), with integer ticks and a labelled colour bar.

    Accepts numpy arrays, nested lists or torch tensors. Row 0 is at the top (layer 0 first).
    """
    from matplotlib.ticker import MaxNLocator

    data = _as_matrix(matrix)
    image = ax.imshow(data, aspect="auto", interpolation="nearest", cmap=cmap, vmin=vmin, vmax=vmax)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(False)
    colorbar = ax.figure.colorbar(image, ax=ax)
    colorbar.set_label(cbar_label)
    return image


def budget_axis(ax: Axes, axis: str = "x", label: str = "KV cache budget (% of full-cache bytes)") -> None:
    """Label an axis holding budgets (fractions of the full cache's bytes, 0..1) and show them as %."""
    from matplotlib.ticker import PercentFormatter

    if axis not in ("x", "y"):
        raise ValueError(f"axis must be 'x' or 'y', got {axis!r}")
    target = ax.xaxis if axis == "x" else ax.yaxis
    target.set_major_formatter(PercentFormatter(xmax=1.0))
    target.set_label_text(label)
