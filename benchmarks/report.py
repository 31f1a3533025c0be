"""Turning results into a Markdown table, JSON and a PNG chart. Pure functions but :func:`write_chart`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

METHOD_COLUMNS: list[tuple[str, str]] = [
    # (header, results key); ratios are to full fine-tuning (training) or to the base model (inference)
    ("trainable", "trainable"),
    ("trainable %", "trainable_percent"),
    ("file KiB", "file_kib"),
    ("file / param bytes", "file_over_params"),
    ("step / full", "step_ratio"),
    ("FLOP ideal", "flop_ideal_ratio"),
    ("FLOPs counted", "flop_counted_ratio"),
    ("step / ideal", "step_over_ideal"),
    ("activations / full", "activation_ratio"),
    ("grads+AdamW / full", "grad_optimizer_ratio"),
    ("peak / full", "peak_ratio"),
    ("infer unmerged / base", "infer_unmerged_ratio"),
    ("infer merged / base", "infer_merged_ratio"),
]


def fmt(value: Any) -> str:
    """Integers with thousands separators, floats to 3 significant digits (>= 100: no decimals), None as a dash."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def derive(row: dict[str, Any], full: dict[str, Any]) -> dict[str, Any]:
    """The ratio columns of one method from its raw measurements and full fine-tuning's."""

    def ratio(key: str, ref: dict[str, Any] = full) -> float | None:
        return row[key] / ref[key] if row.get(key) is not None and ref.get(key) else None

    out = dict(row)
    out["file_kib"] = row["file_bytes"] / 1024 if row.get("file_bytes") is not None else None
    out["file_over_params"] = row["file_bytes"] / row["param_bytes"] if row.get("param_bytes") else None
    out["step_ratio"] = row["step_ratio"] if row.get("step_ratio") is not None else ratio("step_s")  # paired
    out["flop_ideal_ratio"] = ratio("flops_ideal")
    out["flop_counted_ratio"] = ratio("flops_counted")
    out["step_over_ideal"] = (
        out["step_ratio"] / out["flop_ideal_ratio"] if out["step_ratio"] and out["flop_ideal_ratio"] else None
    )
    out["activation_ratio"] = ratio("activation_bytes")
    if row.get("grad_bytes") is not None and full.get("grad_bytes"):
        own, ref = row["grad_bytes"] + row["optimizer_bytes"], full["grad_bytes"] + full["optimizer_bytes"]
        out["grad_optimizer_ratio"] = own / ref
    out["peak_ratio"] = ratio("peak_above_baseline_mib")
    return out


def methods_table(results: dict[str, dict[str, Any]]) -> str:
    rows = [[name, *(r.get(key) for _, key in METHOD_COLUMNS)] for name, r in results.items()]
    return markdown_table(["method", *(h for h, _ in METHOD_COLUMNS)], rows)


def peft_table(results: dict[str, dict[str, Any]]) -> str:
    """ours / peft per method: medians of per-round ratios; the train step's quartiles show the spread."""

    def spread(r: dict[str, Any]) -> str:
        iqr = r.get("train_ratio_iqr")
        return f"{fmt(iqr[0])}-{fmt(iqr[1])}" if iqr else "-"

    rows = [
        [n, r["trainable"], f"{r['max_logit_diff']:.1e}", r["train_ratio"], spread(r), r["infer_ratio"]]
        for n, r in results.items()
    ]
    headers = [
        "method",
        "trainable",
        "max logit diff",
        "train step ours/peft",
        "(quartiles)",
        "forward ours/peft",
    ]
    return markdown_table(headers, rows)


def noise_floor_line(floor: dict[str, dict[str, float]]) -> str:
    """One sentence: how far from 1 an identical copy of the reference measured in this run."""
    parts = [
        f"{kind} {fmt(r['median'])} (quartiles {fmt(r['q1'])}-{fmt(r['q3'])})" for kind, r in floor.items()
    ]
    return (
        "Noise floor of this run (an identical copy of the reference, timed alongside it; 1 on a quiet machine): "
        + ", ".join(parts)
        + "."
    )


def quality_table(rows: list[dict[str, str]]) -> str:
    """Validation accuracy per quickstart config, full fine-tuning first, each with its difference to it.

    ``rows`` are :func:`benchmarks.method_comparison.run`'s (strings as the CLI printed them). The reference is
    the row whose ``method`` is ``"full fine-tuning"``; differences are exact decimal arithmetic on the printed
    values ("-" where there is no successful reference or the row has no accuracy).
    """
    reference = "full fine-tuning"
    rows = sorted(rows, key=lambda r: r.get("method") != reference)  # stable: the others keep their order
    full = rows[0] if rows and rows[0].get("method") == reference and "error" not in rows[0] else None

    def delta(row: dict[str, str]) -> str:
        if row is full:
            return "reference"
        try:
            return f"{Decimal(row['val_acc']) - Decimal(full['val_acc']):+.4f}" if full else "-"
        except (InvalidOperation, KeyError):  # "?" where the run printed no val_acc
            return "-"

    body = [
        [r["config"], *(["failed: " + r["error"][:60], "", "", "", "", ""] if "error" in r else
                        [r.get("method", "-"), r["percent"], r["val_acc"], delta(r), r["val_f1"], r["seconds"]])]
        for r in rows
    ]  # fmt: skip
    headers = ["config", "method", "trainable %", "val acc", "Δ acc vs full", "val F1", "wall s"]
    return markdown_table(headers, body)


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def write_chart(
    path: Path,
    results: dict[str, dict[str, Any]],
    title: str,
    peft: dict[str, dict[str, Any]] | None = None,
    quality: list[dict[str, str]] | None = None,
) -> None:
    """One bar per method in four panels (trainable %, step time vs its FLOP ideal, memory, inference cost), plus
    a panel for the head-to-head with peft and one for the quickstart accuracy when those were measured."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ModuleNotFoundError as error:
        raise ModuleNotFoundError(
            "The benchmark chart needs matplotlib: pip install -e '.[dev]' (or pip install matplotlib), "
            "or pass --no-chart."
        ) from error
    names = list(results)
    panels = 4 + bool(peft) + bool(quality)
    fig = plt.figure(figsize=(4.4 * panels, 0.42 * len(names) + 2))
    axes = [fig.add_subplot(1, panels, 1)]
    axes += [fig.add_subplot(1, panels, i, sharey=axes[0]) for i in (2, 3, 4)]

    def bars(ax, labels, series, title_, ref=None, log=False):
        """``series``: (legend label, one value per label) pairs, drawn as grouped horizontal bars."""
        height = 0.8 / len(series)
        for i, (label, values) in enumerate(series):
            offsets = [k + (i - (len(series) - 1) / 2) * height for k in range(len(labels))]
            ax.barh(offsets, [v or 0 for v in values], height, label=label)
        if ref is not None:
            ax.axvline(ref, color="black", lw=0.8, ls="--")
        if log:
            ax.set_xscale("log")
        ax.set_title(title_, fontsize=10)
        if len(series) > 1:
            ax.legend(fontsize=7, loc="lower right")

    def column(key: str) -> list[Any]:
        return [results[n].get(key) for n in names]

    bars(
        axes[0],
        names,
        [("trainable %", column("trainable_percent"))],
        "trainable parameters, % (log)",
        log=True,
    )
    bars(axes[1], names, [("measured", column("step_ratio")), ("FLOP ideal", column("flop_ideal_ratio"))],
         "train step / full FT", ref=1)  # fmt: skip
    memory = [("saved activations", column("activation_ratio")), ("grads + AdamW", column("grad_optimizer_ratio")),
              ("process peak", column("peak_ratio"))]  # fmt: skip
    bars(axes[2], names, memory, "training memory / full FT", ref=1)
    forward = [("unmerged", column("infer_unmerged_ratio")), ("merged", column("infer_merged_ratio"))]
    bars(axes[3], names, forward, "forward / base model", ref=1)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    for ax in axes[1:]:
        ax.tick_params(labelleft=False)
    if peft:
        ax = fig.add_subplot(1, panels, 5)
        pairs = list(peft)
        series = [("train step", [peft[n]["train_ratio"] for n in pairs]),
                  ("forward", [peft[n]["infer_ratio"] for n in pairs])]  # fmt: skip
        bars(ax, pairs, series, "lightning-peft / HF peft (< 1: faster)", ref=1)
        ax.axvline(0.95, color="grey", lw=0.8, ls=":")
        ax.set_yticks(range(len(pairs)), pairs)
        ax.invert_yaxis()
    if quality:
        ax = fig.add_subplot(1, panels, panels)
        rows = [r for r in quality if "error" not in r and _decimal(r.get("val_acc")) is not None]
        labels = [r["config"] for r in rows]
        bars(
            ax, labels, [("val acc", [float(r["val_acc"]) for r in rows])], "quickstart val accuracy", ref=0.5
        )
        full = next((r for r in rows if r.get("method") == "full fine-tuning"), None)
        if full is not None:
            ax.axvline(float(full["val_acc"]), color="red", lw=0.8, ls=":", label="full fine-tuning")
        ax.set_yticks(range(len(labels)), labels)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _decimal(value: Any) -> Decimal | None:
    try:
        return Decimal(str(value))
    except (InvalidOperation, ValueError):
        return None


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.report DIR``: redraw ``DIR/results.png`` from ``DIR/results.json`` (no rerun)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("directory", type=Path, help="a results folder, e.g. benchmarks/results/llama")
    directory = parser.parse_args(argv).directory
    data = json.loads((directory / "results.json").read_text())
    title = (directory / "results.md").read_text().splitlines()[0].removeprefix("### ")
    write_chart(directory / "results.png", data["methods"], title, data.get("peft"), data.get("quality"))
    print(f"wrote {directory / 'results.png'}")


if __name__ == "__main__":
    main()
