"""torch.compile and LoRA: the compiled training step against the eager one, ours beside Hugging Face peft's.

Four setups on the same base model, batch and adapter weights (all-linear LoRA, r=8): ours eager, ours compiled,
peft eager, peft compiled, each ``torch.compile(model, backend=...)`` (default inductor). Compilation happens in
untimed warm-up steps; then one step of each setup per round, interleaved, and only ratios of medians of the
per-round ratios are reported. Before timing, the compiled models' logits are checked against the eager ones.

Usage:
    python -m benchmarks.compile_step                       # Llama-shaped, hidden 512, 4 layers, inductor
    python -m benchmarks.compile_step --backend aot_eager --rounds 20 --hidden 256
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.head_to_head import Side, prepare
from benchmarks.measure import interleaved, paired_ratio

RATIOS = (
    ("ours compiled / ours eager", "ours_compiled", "ours_eager"),
    ("peft compiled / peft eager", "peft_compiled", "peft_eager"),
    ("ours compiled / peft compiled", "ours_compiled", "peft_compiled"),
    ("ours eager / peft eager", "ours_eager", "peft_eager"),
)


def compiled_side(side: Side, backend: str) -> Side:
    """The same model (shared parameters and optimizer) called through ``torch.compile``."""
    twin = Side.__new__(Side)
    twin.model, twin.batch, twin.inputs = torch.compile(side.model, backend=backend), side.batch, side.inputs
    twin.optimizer = side.optimizer
    return twin


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``label -> {median, q1, q3}`` of the per-round ratios, plus ``max_logit_diff`` per compiled side."""
    ours, theirs, diff = prepare(args, "lora")
    sides = {"ours_eager": ours, "peft_eager": theirs}
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
    for side in sides.values():
        side.model.train()
        for _ in range(args.warmup):  # compiles forward and backward graphs, untimed
            side.train_step()
    samples = interleaved({name: side.train_step for name, side in sides.items()}, args.rounds)
    for label, name, reference in RATIOS:
        results[label] = paired_ratio(samples, name, reference)
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


if __name__ == "__main__":
    main()
