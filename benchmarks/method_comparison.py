"""Every method on the quickstart task, measured in one run: trainable share, validation accuracy, wall time.

Runs ``lightning-peft fit`` on each config in ``configs/`` that uses the quickstart task (the embedded
all-MiniLM-L6-v2 and sentiment data), one after the other on the same machine, and prints a Markdown table.
Full fine-tuning (``configs/full_finetune.yaml``, ``peft.method: null``) runs first: it is the reference, and
every row shows its accuracy difference to it. All configs share the seed, batch size and epochs, so every
method gets the same number of optimizer steps. The majority-class baseline of the validation split is 0.50.

Usage: python benchmarks/method_comparison.py [--configs full_finetune quickstart ia3 ...] [--epochs 3]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TASK = "lightning_peft.app.tasks.SequenceClassificationModule"
REFERENCE = "full_finetune"  # configs/full_finetune.yaml: the quickstart task with every parameter trained
FULL_FINETUNING = "full fine-tuning"  # the "method" of its row (report.quality_table looks for it)


def single_process(path: Path) -> bool:
    """The config trains in this one process: one device, one node, no strategy (the DDP, multi-node and FSDP
    configs would start or wait for other processes)."""
    trainer = (yaml.safe_load(path.read_text()) or {}).get("trainer") or {}
    return (
        trainer.get("devices", 1) in (1, "1")
        and trainer.get("num_nodes", 1) == 1
        and "strategy" not in trainer
    )


def quickstart_task_configs() -> list[str]:
    """Single-process config names of the quickstart task, the full fine-tuning reference first, then
    alphabetically."""
    names = sorted(
        p.stem for p in (ROOT / "configs").glob("*.yaml") if TASK in p.read_text() and single_process(p)
    )
    return sorted(names, key=lambda name: name != REFERENCE)


def run(config: str, epochs: int) -> dict[str, str]:
    """Fit one config through the CLI; the row holds the strings it printed (or ``error``)."""
    with tempfile.TemporaryDirectory() as root:
        command = [
            str(Path(sys.executable).with_name("lightning-peft")), "fit", "--config", str(ROOT / "configs" / f"{config}.yaml"),
            "--trainer.default_root_dir", root, "--trainer.max_epochs", str(epochs), "--trainer.enable_progress_bar", "false",
        ]  # fmt: skip
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
        seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    # "lightning-peft: LoRA 'default' trains ..." or "lightning-peft: full fine-tuning (no PEFT method) trains ..."
    trains = re.search(r"lightning-peft: (.+?) trains ([\d,]+) of ([\d,]+) parameters \(([\d.]+)%\)", output)
    final = re.findall(r"lightning-peft: final metrics (.*)", output)  # not the checkpoint name's val_acc
    metrics = dict(re.findall(r"(val_acc|val_f1)=([\d.]+)", final[-1] if final else ""))
    if done.returncode != 0 or trains is None:
        return {"config": config, "error": output.strip().splitlines()[-1] if output.strip() else "failed"}
    who = trains.group(1)
    method = FULL_FINETUNING if who.startswith(FULL_FINETUNING) else re.sub(r" '[^']*'$", "", who)
    return {
        "config": config, "method": method, "trainable": trains.group(2), "total": trains.group(3),
        "percent": trains.group(4), "val_acc": metrics.get("val_acc", "?"), "val_f1": metrics.get("val_f1", "?"),
        "seconds": f"{seconds:.0f}",
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--configs", nargs="*", default=None, help="default: every quickstart-task config")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))  # run as a script: make the `benchmarks` package importable
    from benchmarks import report

    rows = []
    for config in args.configs or quickstart_task_configs():
        rows.append(run(config, args.epochs))
        print(f"{config}: {rows[-1]}", file=sys.stderr, flush=True)
    print(report.quality_table(rows))


if __name__ == "__main__":
    main()
