"""Every PEFT method on one model, measured in one run; writes results.md, results.json and results.png.

For each method (and full fine-tuning as the reference): trainable parameters, adapter file bytes, training-step
time against full fine-tuning and against the FLOP-ideal ratio (benchmarks/flops.py states the model), memory of
a training step (tensors saved for backward, gradients + AdamW state, process peak in a fresh subprocess), and
forward latency unmerged and merged against the base model. Then lightning-peft vs Hugging Face peft on identical
LoRA, IA3 and prompt-tuning configs, the speed features against their targets (benchmarks/speed.py: compiled
vs eager, shared-input LoRA, packed SFT, chunked loss; ``--no-speed`` skips them), and optionally (``--quality``, minutes) every quickstart config's
validation accuracy via benchmarks/method_comparison.py.

Timings interleave all setups round by round in one process and only ratios of medians are reported, so load
from other processes hits every setup alike; absolute milliseconds are in the JSON for reference only.

Usage:
    python -m benchmarks                                   # Llama-shaped, hidden 512, 4 layers, all methods
    python -m benchmarks --methods lora lora_qv ia3 --rounds 20
    python -m benchmarks --model minilm --seq 64 --batch 16 --no-peft   # the embedded quickstart encoder
    python -m benchmarks --quality --epochs 3              # + validation accuracy per quickstart config
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import measure, report
from benchmarks.measure import BASE, FULL, Setup
from benchmarks.models import (
    check_model,
    is_causal_lm,
    method_catalogue,
    model_label,
    model_shape,
)


def build_parser(
    prog: str = "python -m benchmarks", description: str | None = __doc__
) -> argparse.ArgumentParser:
    """The options every benchmark shares (model, batch, rounds, threads, ...); other benchmarks add theirs."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", type=check_model, default="llama",
        help="llama (built from a config: --hidden, --layers), minilm (the embedded quickstart encoder), or the "
        "path of your own Hugging Face model folder (causal LM or sequence classifier, from its config)",
    )  # fmt: skip
    parser.add_argument("--hidden", type=int, default=512, help="Llama hidden size")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=None, help="default: all (see benchmarks/models.py)")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (each: one call of every setup)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/<model>")
    parser.add_argument("--no-peak", action="store_true", help="skip the per-method subprocess peak memory")
    parser.add_argument("--no-peft", action="store_true", help="skip the head-to-head with Hugging Face peft")
    parser.add_argument("--no-chart", action="store_true")
    parser.add_argument(
        "--no-speed", action="store_true",
        help="skip the speed-feature rows against their targets (compile, shared-input, packing, chunked loss)",
    )  # fmt: skip
    parser.add_argument(
        "--quality", action="store_true", help="run benchmarks/method_comparison.py (minutes)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per config with --quality")
    parser.add_argument("--peak-child", default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prepare(args: argparse.Namespace, names: list[str]) -> tuple[dict[str, Setup], dict[str, str]]:
    setups, skipped = {FULL: Setup(args, FULL)}, {}
    for name in names:
        try:
            setups[name] = Setup(args, name)
        except (ValueError, TypeError) as error:  # e.g. BitFit on a bias-free Llama: recorded, not fatal
            skipped[name] = str(error).split(".")[0]
    return setups, skipped


def static_measurements(args: argparse.Namespace, setups: dict[str, Setup]) -> dict[str, dict[str, Any]]:
    shape = model_shape(setups[FULL].model)
    results = {}
    for name, setup in setups.items():
        row: dict[str, Any] = measure.trainable(setup.model)
        row["flops_ideal"] = measure.ideal_step_flops(args, shape, setup.model, setup.method)
        row["flops_counted"] = measure.counted_flops(setup)
        if setup.method is not None:
            row.update(measure.adapter_file(setup.model))
            row["mergeable"] = setup.method.mergeable
        row["activation_bytes"] = measure.saved_activation_bytes(setup)
        row.update(measure.grad_and_optimizer_bytes(setup))
        results[name] = row
    return results


def timings(
    args: argparse.Namespace, setups: dict[str, Setup], results: dict[str, dict[str, Any]]
) -> dict[str, dict[str, float]]:
    """Step and forward times into ``results``; returns this run's noise floor: the ratio of a second, identical
    copy of the reference (full fine-tuning; the base model) timed alongside it, which would be 1 on a quiet
    machine."""
    log(f"timing training steps: {len(setups) + 1} setups x {args.rounds} rounds")
    control = FULL + " copy"
    calls = {n: s.train_step for n, s in setups.items()} | {control: Setup(args, FULL).train_step}
    train = measure.interleaved(calls, args.rounds)
    floor = {"train": measure.paired_ratio(train, control, FULL)}
    del train[control]
    for name, seconds in measure.median_seconds(train).items():
        results[name]["step_s"] = seconds
        step = measure.paired_ratio(train, name, FULL)
        results[name]["step_ratio"], results[name]["step_ratio_iqr"] = (
            step["median"],
            (step["q1"], step["q3"]),
        )
    # Inference: the untouched base model, every method unmerged, and every mergeable one merged (rebuilt, merged).
    inference = {BASE: Setup(args, BASE), BASE + " copy": Setup(args, BASE)}
    for name, setup in setups.items():
        if name != FULL:
            inference[name] = setup
            if setup.method.mergeable:
                inference[name + "+merged"] = Setup(args, name, merged=True)
    for setup in inference.values():  # every one in eval mode: dropout (MiniLM has 0.1) is no inference cost
        setup.model.eval()
    log(f"timing forwards: {len(inference)} setups x {args.rounds * 2} rounds")
    infer = measure.interleaved({name: setup.infer for name, setup in inference.items()}, args.rounds * 2)
    medians = measure.median_seconds(infer)
    for name in setups:
        results[name]["infer_s"] = medians.get(name)
        for key, timed in (("infer_unmerged_ratio", name), ("infer_merged_ratio", name + "+merged")):
            results[name][key] = (
                measure.paired_ratio(infer, timed, BASE)["median"] if timed in infer else None
            )
    results[FULL]["infer_base_s"] = medians[BASE]
    floor["forward"] = measure.paired_ratio(infer, BASE + " copy", BASE)
    return floor


def machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.peak_child:  # before any torch op in this process: the children are forked from it
        print(json.dumps(measure.peak_children(args, args.peak_child.split(","))))
        return
    torch.set_num_threads(args.threads)
    names = args.methods or list(method_catalogue(args.model))
    unknown = sorted(set(names) - set(method_catalogue(args.model)))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {list(method_catalogue(args.model))}")
    out = args.out or Path(__file__).resolve().parent / "results" / model_label(args.model)
    out.mkdir(parents=True, exist_ok=True)
    info = machine()
    started = info["started"] = time.perf_counter()

    setups, skipped = prepare(args, names)
    log(f"measuring {list(setups)} (skipped: {skipped or 'none'})")
    raw = static_measurements(args, setups)
    log(f"static measurements done ({time.perf_counter() - started:.0f} s)")
    floor = timings(args, setups, raw)
    if not args.no_peak:
        log(f"peak memory: one forked process per setup ({time.perf_counter() - started:.0f} s so far)")
        for name, peak in measure.process_peaks(args, list(setups)).items():
            raw[name].update(peak)
    results = {name: report.derive(row, raw[FULL]) for name, row in raw.items()}

    described = {
        "minilm": "MiniLM (embedded all-MiniLM-L6-v2)",
        "llama": f"Llama-shaped, hidden {args.hidden}, {args.layers} layers (random init)",
    }.get(
        args.model, f"{model_label(args.model)} ({'causal LM' if is_causal_lm(args.model) else 'classifier'})"
    )
    title = f"{described}, batch {args.batch}x{args.seq}, {args.threads} threads, {args.rounds} rounds"
    sections = [f"### {title}", "", report.methods_table(results), "", report.noise_floor_line(floor)]
    if skipped:
        sections += ["", "Skipped: " + "; ".join(f"{n}: {why}" for n, why in skipped.items())]
    data: dict[str, Any] = {
        "config": vars(args) | {"out": str(out)},
        "machine": info,
        "methods": results,
        "noise_floor": floor,
        "skipped": skipped,
    }
    write_outputs(
        out, sections, data, info
    )  # now, and again with each later section: a failure loses nothing
    if not args.no_peft and args.model == "llama":
        from benchmarks import head_to_head

        log("head-to-head with Hugging Face peft")
        data["peft"] = head_to_head.run(args)
        sections += [
            "",
            "#### vs Hugging Face peft (ours / peft, identical config and weights)",
            "",
            report.peft_table(data["peft"]),
        ]
    if not args.no_speed and not args.no_peft and args.model == "llama":
        from benchmarks import speed

        log("speed features: compile, shared-input LoRA, packing, chunked loss (benchmarks/speed.py)")
        data["speed"] = speed.run(args)
        sections += ["", "#### Speed features against their targets", "", speed.table(data["speed"])]
        write_outputs(out, sections, data, info)
    if args.quality:
        from benchmarks.method_comparison import quickstart_task_configs, run

        log("quality: every quickstart config through the CLI")
        data["quality"] = [run(config, args.epochs) for config in quickstart_task_configs()]
        sections += [
            "",
            f"#### Quickstart task (MiniLM), validation after {args.epochs} epochs",
            "",
            report.quality_table(data["quality"]),
        ]
    write_outputs(out, sections, data, info)
    if not args.no_chart:
        report.write_chart(out / "results.png", results, title, data.get("peft"), data.get("quality"))
    print((out / "results.md").read_text())
    log(f"wrote {out}/results.md, results.json{'' if args.no_chart else ', results.png'}")


def write_outputs(out: Path, sections: list[str], data: dict[str, Any], info: dict[str, Any]) -> None:
    """Write results.md and results.json from what is measured so far, with the machine and its load."""
    info["load_average_1m_end"] = os.getloadavg()[0]
    info["wall_s"] = time.perf_counter() - info["started"]
    footer = (
        f"Machine: {info['processor']}, {info['cpus']} CPUs, torch {info['torch']}; load average "
        f"{info['load_average_1m']:.1f} -> {info['load_average_1m_end']:.1f} (shared machine: only ratios of "
        f"interleaved medians are meaningful); {info['wall_s']:.0f} s."
    )
    (out / "results.md").write_text("\n".join([*sections, "", footer]) + "\n")
    report.write_json(out / "results.json", data)


if __name__ == "__main__":
    main()
