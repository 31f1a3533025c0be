"""The LoRA training step, eager and compiled, ours beside Hugging Face peft's and full fine-tuning's, with the
bounds that say how far each ratio could go.

Five setups on the same base model and batch (all-linear LoRA, r=8, the same adapter weights): ours eager, ours
compiled, peft eager, peft compiled (each ``torch.compile(model, backend=...)``, default inductor) and full
fine-tuning eager, plus an identical copy of full fine-tuning whose ratio to it is the run's noise floor. Compilation happens in untimed warm-up steps; then one step of each setup per round,
interleaved, and only medians of the per-round ratios are reported. Before timing, the compiled models' logits
are checked against the eager ones.

Two bounds come with the ratios, both from this run:

- **FLOP ideal**: LoRA's step FLOPs over full fine-tuning's (benchmarks/flops.py), the step/full ratio of a LoRA
  step that ran every matmul at full fine-tuning's speed and spent nothing else. Divided by peft's measured
  step/full ratio it is the ours/peft ratio such a step would reach (``ours/peft at the FLOP ideal``).
- **Matmul share**: the fraction of our eager step's operator time (torch.profiler, self CPU time) spent in
  matmuls and attention kernels, which compiling leaves to the same BLAS/attention kernels. A compiled step that
  fused every other operator into nothing would take that fraction of the eager step (``compiled/eager floor``).

Usage:
    python -m benchmarks.compile_step                       # Llama-shaped, hidden 512, 4 layers, inductor
    python -m benchmarks.compile_step --backend aot_eager --rounds 20 --hidden 256
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.head_to_head import Side, pairs, prepare
from benchmarks.measure import FULL, Setup, ideal_step_flops, interleaved, paired_ratio
from benchmarks.models import model_shape

RATIOS = (
    ("ours compiled / ours eager", "ours_compiled", "ours_eager"),
    ("peft compiled / peft eager", "peft_compiled", "peft_eager"),
    ("ours compiled / peft compiled", "ours_compiled", "peft_compiled"),
    ("ours eager / peft eager", "ours_eager", "peft_eager"),
    ("ours eager / full fine-tuning", "ours_eager", "full"),
    ("peft eager / full fine-tuning", "peft_eager", "full"),
)
#: Operators compiling hands to the same kernels it would call eagerly (BLAS matmuls, the attention kernels).
MATMULS = re.compile(r"aten::(mm|addmm_?|bmm|baddbmm|_scaled_dot_product_\w+)$")


def compiled_side(side: Side, backend: str) -> Side:
    """The same model (shared parameters and optimizer) called through ``torch.compile``."""
    twin = Side.__new__(Side)
    twin.model, twin.batch, twin.inputs = torch.compile(side.model, backend=backend), side.batch, side.inputs
    twin.optimizer = side.optimizer
    return twin


def matmul_share(step: Callable[[], None], steps: int = 3) -> float:
    """Fraction of ``step``'s operator time (self CPU time, ``steps`` steps under torch.profiler) in
    :data:`MATMULS`."""
    step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    return sum(e.self_cpu_time_total for e in events if MATMULS.match(e.key)) / total


def flop_ideal(args: argparse.Namespace, lora: Side, full: Setup) -> float:
    """LoRA's training-step FLOPs over full fine-tuning's (benchmarks/flops.py)."""
    shape = model_shape(full.model)
    method = pairs()["lora"][0]()  # the configuration ``lora`` was built with
    return ideal_step_flops(args, shape, lora.model, method) / ideal_step_flops(args, shape, full.model, None)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``label -> {median, q1, q3}`` of the per-round ratios, ``max_logit_diff`` per compiled side, and
    ``bounds``: the FLOP ideal, ours/peft at the FLOP ideal, our eager step's matmul share."""
    ours, theirs, diff = prepare(args, "lora")
    full = Setup(args, FULL)
    # full_copy: a second, identical full fine-tuning, timed alongside it: its ratio is this run's noise floor
    sides = {"ours_eager": ours, "peft_eager": theirs, "full": full, "full_copy": Setup(args, FULL)}
    sides["ours_compiled"] = compiled_side(ours, args.backend)
    sides["peft_compiled"] = compiled_side(theirs, args.backend)
    results: dict[str, dict[str, float]] = {"ours_vs_peft": {"max_logit_diff": diff}}
    with torch.no_grad():
        for name in ("ours", "peft"):
            eager, compiled = sides[f"{name}_eager"], sides[f"{name}_compiled"]
            eager.model.eval()
            gap = (
                (compiled.model(**eager.batch).logits - eager.model(**eager.batch).logits).abs().max().item()
            )
            results[f"{name}_compiled"] = {"max_logit_diff": gap}
    for name, side in sides.items():
        side.model.train()
        for _ in range(args.warmup if name.endswith("compiled") else 1):  # compiles the graphs, untimed
            side.train_step()
    share = matmul_share(ours.train_step)
    samples = interleaved({name: side.train_step for name, side in sides.items()}, args.rounds)
    for label, name, reference in RATIOS:
        results[label] = paired_ratio(samples, name, reference)
    results["noise_floor"] = paired_ratio(samples, "full_copy", "full")
    ideal = flop_ideal(args, ours, full)
    results["bounds"] = {
        "flop_ideal": ideal,
        "ours_vs_peft_at_flop_ideal": ideal / results["peft eager / full fine-tuning"]["median"],
        "matmul_share": share,
    }
    return results


def main(argv: list[str] | None = None) -> None:
    from benchmarks.__main__ import build_parser

    parser = build_parser("python -m benchmarks.compile_step", __doc__)
    parser.add_argument(
        "--backend", default="inductor", help="torch.compile backend (inductor, aot_eager, ...)"
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per setup (compilation)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    print(f"LoRA all-linear r=8, {args.layers} layers, hidden {args.hidden}, batch {args.batch}x{args.seq}, "
          f"backend {args.backend}, {args.rounds} rounds, {args.threads} threads")  # fmt: skip
    for name in ("ours_compiled", "peft_compiled"):
        print(f"  {name.replace('_', ' ')} vs eager: max |logit diff| {results[name]['max_logit_diff']:.2e}")
    print("| step time ratio | median | quartiles |\n|---|---|---|")
    for label, _, _ in RATIOS:
        r = results[label]
        print(f"| {label} | {r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |")
    floor = results["noise_floor"]
    print(f"Noise floor (an identical copy of full fine-tuning / itself): {floor['median']:.3f} "
          f"({floor['q1']:.3f}-{floor['q3']:.3f})")  # fmt: skip
    bounds = results["bounds"]
    print(f"FLOP ideal LoRA / full {bounds['flop_ideal']:.3f}: ours eager at {results['ours eager / full fine-tuning']['median'] / bounds['flop_ideal']:.3f}x "
          f"the ideal; a step at the ideal would be {bounds['ours_vs_peft_at_flop_ideal']:.3f} x peft")  # fmt: skip
    print(f"Matmul + attention share of our eager step {bounds['matmul_share']:.3f}: the compiled / eager floor if "
          "compiling made every other operator free")  # fmt: skip


if __name__ == "__main__":
    main()
