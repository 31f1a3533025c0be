"""Training and validation curves from a run's ``metrics.csv`` (Lightning's CSVLogger), drawn to a PNG.

``lightning-peft fit`` draws ``curves.png`` beside ``metrics.csv`` when matplotlib is installed (the ``plot``
extra: ``pip install 'lightning-peft[plot]'``); without it the run says how to get one. Also usable alone::

    from lightning_peft.app.curves import plot_curves
    plot_curves("runs/quickstart/lightning_logs/version_0/metrics.csv")   # -> .../curves.png
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
from pathlib import Path

#: Columns that index rows rather than measure anything.
INDEX_COLUMNS = ("epoch", "step")
#: Prefixes of columns that are not curves: test metrics (single points after training) and lightning-peft's
#: parameter counts (constants).
NOT_CURVES = ("test_", "peft/")


def read_curves(metrics_csv: str | Path) -> dict[str, list[tuple[int, float]]]:
    """Each logged metric of a ``metrics.csv`` as ``(step, value)`` points, in file order.

    CSVLogger writes one row per logging call with empty cells for the metrics that call did not log; those
    cells (and non-finite values) are skipped, and so are the columns of :data:`NOT_CURVES`.

    Raises:
        ValueError: the file has no ``step`` column (not a CSVLogger file).
    """
    path = Path(metrics_csv)
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        if "step" not in (reader.fieldnames or ()):
            raise ValueError(f"{path}: no 'step' column; expected the metrics.csv of Lightning's CSVLogger.")
        curves: dict[str, list[tuple[int, float]]] = {}
        for row in reader:
            step = int(float(row["step"]))
            for name, cell in row.items():
                if name in INDEX_COLUMNS or name.startswith(NOT_CURVES) or cell in ("", None):
                    continue
                value = float(cell)
                if math.isfinite(value):
                    curves.setdefault(name, []).append((step, value))
    return curves


def plot_curves(metrics_csv: str | Path, output: str | Path | None = None) -> tuple[Path, list[str]]:
    """Draw the curves of ``metrics_csv``: losses on the left panel, every other metric on the right.

    Args:
        metrics_csv: A CSVLogger ``metrics.csv``.
        output: The PNG to write; ``None``: ``curves.png`` beside ``metrics_csv``. Written atomically.

    Returns:
        ``(png path, names of the curves drawn)``.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (install the ``plot`` extra).
        ValueError: the file holds no curve to draw.
    """
    try:
        from matplotlib.figure import Figure  # optional dependency: the `plot` extra
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "curves.png needs matplotlib: pip install 'lightning-peft[plot]' (or pip install matplotlib)."
        ) from error
    curves = read_curves(metrics_csv)
    if not curves:
        raise ValueError(f"{metrics_csv}: no metric was logged, so there is no curve to draw.")
    output = Path(output) if output is not None else Path(metrics_csv).with_name("curves.png")
    losses = [name for name in curves if "loss" in name]
    others = [name for name in curves if name not in losses]
    groups = [(title, names) for title, names in (("loss", losses), ("metrics", others)) if names]
    figure = Figure(figsize=(5 * len(groups), 4), layout="constrained")
    for axis, (title, names) in zip(figure.subplots(1, len(groups), squeeze=False)[0], groups, strict=True):
        for name in names:
            steps, values = zip(*curves[name], strict=True)
            # Per-epoch metrics are a handful of points: mark them so a single one is visible.
            axis.plot(steps, values, label=name, marker="o" if len(steps) < 30 else None)
        axis.set_xlabel("step")
        axis.set_title(title)
        axis.grid(alpha=0.3)
        axis.legend()
    output.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=output.parent, prefix=f".{output.name}.", suffix=".png")
    os.close(handle)
    try:
        figure.savefig(temporary, dpi=100)
        os.replace(temporary, output)
    finally:
        Path(temporary).unlink(missing_ok=True)
    return output, [*losses, *others]
