"""Every method on the quickstart task, measured in one run: trainable share, validation accuracy, wall time.

Runs ``lightning-peft fit`` on each config in ``configs/`` that uses the quickstart task (the embedded
all-MiniLM-L6-v2 and sentiment data), one after the other on the same machine, and prints a Markdown table.
The majority-class baseline of the validation split is 0.50.

Usage: python benchmarks/method_comparison.py [--configs quickstart ia3 ...] [--epochs 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASK = "lightning_peft.tasks.SequenceClassificationModule"


def quickstart_task_configs() -> list[str]:
    return sorted(
        p.stem
        for p in (ROOT / "configs").glob("*.yaml")
        if TASK in p.read_text() and "devices: 2" not in p.read_text()
    )


def run(config: str, epochs: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as root:
        command = [
            str(Path(sys.executable).with_name("lightning-peft")), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
            "--trainer.default_root_dir", root, "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    trains = re.search(r"trains ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\)", output)
    metrics = dict(re.findall(r"(val_acc|val_f1)=([\d.]+)", output))
    if done.returncode != 0 or trains is None:
        return {"config": config, "error": output.strip().splitlines()[-1] if output.strip() else "failed"}
    return {
        "config": config, "trainable": trains.group(1), "percent": trains.group(3),
        "val_acc": metrics.get("val_acc", "?"), "val_f1": metrics.get("val_f1", "?"), "seconds": f"{seconds:.0f}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="*", default=None)
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    configs = args.configs or quickstart_task_configs()
    print(
        "| config | trainable | trainable % | val acc (last epoch) | val F1 | wall s |\n|---|---|---|---|---|---|"
    )
    for config in configs:
        row = run(config, args.epochs)
        if "error" in row:
            print(f"| {config} | failed: {row['error'][:80]} | | | | |", flush=True)
        else:
            print(
                f"| {config} | {row['trainable']} | {row['percent']} | {row['val_acc']} | {row['val_f1']} | {row['seconds']} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
