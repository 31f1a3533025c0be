"""The speed features side by side with their targets: ``python -m benchmarks``'s speed table.

One row per target, each from the benchmark that measures it, in this order (each its own interleaved run, so a
row's ratio compares setups timed seconds apart):

- benchmarks/compile_step.py: the LoRA step ours / peft, ours / full fine-tuning against the FLOP ideal,
  compiled / eager, ours compiled / peft compiled;
- benchmarks/shared_input.py: shared-input LoRA / separate layers;
- benchmarks/packing.py: packed / padded tokens per second on lengths 16-512;
- benchmarks/chunked_loss.py: the chunked LM loss's peak memory and step time against the plain loss.

The compile and shared-input rows run on the main benchmark's model (``--hidden``, ``--layers``, ``--batch``,
``--seq``); packing and the chunked loss keep their own batches (examples of 16-512 tokens; 2 x 1024 tokens at
vocabulary 32 000) on the same hidden size and depth.
"""

from __future__ import annotations

import argparse
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

#: ``(row, target, comparison)``: a row is met when ``value <= target`` (``>=`` for speed-ups); a row without a
#: target (``None``) is reported only.
TARGETS: tuple[tuple[str, float | None, str], ...] = (
    ("LoRA step, ours / peft (eager)", 0.85, "<="),
    ("LoRA step, ours / full fine-tuning, over the FLOP ideal", 1.05, "<="),
    ("LoRA step, ours compiled / ours eager", 0.85, "<="),
    ("LoRA step, ours compiled / peft compiled", 1.0, "<="),
    ("shared-input LoRA step / separate layers", None, ""),
    ("packed / padded SFT tokens/s", 1.5, ">="),
    ("chunked / plain loss: peak memory of the loss", 0.5, "<="),
    ("chunked / plain loss: training step time", 1.05, "<="),
)


def _sub_args(
    args: argparse.Namespace, parser: argparse.ArgumentParser, argv: list[str]
) -> argparse.Namespace:
    """A sub-benchmark's defaults (and ``argv``) with the main run's model depth, width, rounds and threads."""
    sub = parser.parse_args(argv)
    for key in ("hidden", "layers", "rounds", "threads"):
        setattr(sub, key, getattr(args, key))
    return sub


def chunked_loss_in_fresh_process(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:
    """benchmarks/chunked_loss.py in a fresh interpreter: its peak-memory children are forked before any torch op
    (this process has run many), and its peaks mix with no memory of this one."""
    argv = [f"--{key}={getattr(args, key)}" for key in ("hidden", "layers", "rounds", "threads")] + extra
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.chunked_loss", *argv, "--json"],
        capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1], check=False,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"benchmarks.chunked_loss failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace, overrides: dict[str, list[str]] | None = None) -> dict[str, Any]:
    """``rows``: ``label -> {value, q1, q3, target, comparison, met}``, and each sub-benchmark's own results.
    ``overrides``: more command-line arguments for ``packing`` and ``chunked_loss`` (their sizes)."""
    overrides = overrides or {}
    from benchmarks import compile_step, packing, shared_input

    compile_args = copy.copy(args)
    compile_args.backend, compile_args.warmup = getattr(args, "backend", "inductor"), 3
    compiled = compile_step.run(compile_args)
    shared = shared_input.run(args)
    packed = packing.run(_sub_args(args, packing.build_parser(), overrides.get("packing", [])))
    chunked = chunked_loss_in_fresh_process(args, overrides.get("chunked_loss", []))

    ideal = compiled["bounds"]["flop_ideal"]
    over_ideal = {k: v / ideal for k, v in compiled["ours eager / full fine-tuning"].items()}
    loss_peak = chunked["chunked"]["loss_peak_mib"] / chunked["plain"]["loss_peak_mib"]
    values = [
        compiled["ours eager / peft eager"],
        over_ideal,
        compiled["ours compiled / ours eager"],
        compiled["ours compiled / peft compiled"],
        shared["shared / separate"],
        {"median": packed["speedup"], "q1": packed["speedup_q1"], "q3": packed["speedup_q3"]},
        {"median": loss_peak, "q1": loss_peak, "q3": loss_peak},  # one measurement per side: no spread
        chunked["step"],
    ]
    rows = {}
    for (label, target, comparison), value in zip(TARGETS, values, strict=True):
        met = (
            None
            if target is None
            else value["median"] <= target
            if comparison == "<="
            else value["median"] >= target
        )
        rows[label] = {**value, "target": target, "comparison": comparison, "met": met}
    return {
        "rows": rows,
        "compile_step": compiled,
        "shared_input": shared,
        "packing": packed,
        "chunked_loss": chunked,
    }


def table(results: dict[str, Any]) -> str:
    lines = ["| speed target | measured (quartiles) | target | met |", "|---|---|---|---|"]
    for label, r in results["rows"].items():
        spread = "" if r["q1"] == r["q3"] else f" ({r['q1']:.3f}-{r['q3']:.3f})"
        target = "-" if r["target"] is None else f"{r['comparison']} {r['target']}"
        met = "-" if r["met"] is None else "yes" if r["met"] else "no"
        lines.append(f"| {label} | {r['median']:.3f}{spread} | {target} | {met} |")
    compiled, packed, chunked = results["compile_step"], results["packing"], results["chunked_loss"]
    floor = compiled["noise_floor"]
    lines += [
        "",
        f"Noise floor of the compile rows (an identical copy of full fine-tuning / itself): {floor['median']:.3f} "
        f"({floor['q1']:.3f}-{floor['q3']:.3f}). "
        f"Checks: compiled logits vs eager max |diff| {compiled['ours_compiled']['max_logit_diff']:.1e} (ours), "
        f"{compiled['peft_compiled']['max_logit_diff']:.1e} (peft); shared-input vs separate "
        f"{results['shared_input']['checks']['shared_vs_separate_max_logit_diff']:.1e}; token-mean loss packed "
        f"{packed['packed_loss']:.6f} vs padded {packed['padded_loss']:.6f}; chunked vs plain |loss diff| "
        f"{chunked['checks']['loss_diff']:.1e}, max |grad diff| {chunked['checks']['max_grad_diff']:.1e}. "
        f"FLOP ideal LoRA / full {compiled['bounds']['flop_ideal']:.3f} (a step at it: "
        f"{compiled['bounds']['ours_vs_peft_at_flop_ideal']:.3f} x peft); matmul + attention share of our eager "
        f"step {compiled['bounds']['matmul_share']:.3f} (the compiled / eager floor).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.speed [--rounds 10 ...]``: only the speed table (``python -m benchmarks`` ends with
    it), printed."""
    import torch

    from benchmarks.__main__ import build_parser

    parser = build_parser("python -m benchmarks.speed", __doc__)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compile rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch}x{args.seq}, {args.rounds} rounds, "
          f"{args.threads} threads, backend {args.backend}")  # fmt: skip
    print(table(run(args)))


if __name__ == "__main__":
    main()
