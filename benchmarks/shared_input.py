"""Shared-input LoRA: the all-linear LoRA training step with shared A products, beside separate layers and peft.

Three setups on the same base model, batch and adapter weights (all-linear LoRA, r=8, alpha=16): ours with
:func:`~lightning_peft.methods.lora.shared_input.share_lora_inputs` (q/k/v and gate/up each compute their A
products as one matmul), ours with separate layers (the default: one fused kernel per layer), and peft. Before
timing, the shared model's logits are checked against the separate one's; then one step of each setup per
round, interleaved, and only medians of the per-round ratios are reported (with their quartiles).

Usage:
    python -m benchmarks.shared_input --threads 2            # Llama-shaped, hidden 512, 4 layers, batch 4x128
    python -m benchmarks.shared_input --rounds 30 --hidden 1024
"""

from __future__ import annotations

import argparse
import copy

import torch

from benchmarks.head_to_head import Side, prepare
from benchmarks.measure import interleaved, paired_ratio
from lightning_peft.methods.lora.shared_input import share_lora_inputs

RATIOS = (
    ("shared / separate", "shared", "separate"),
    ("shared / peft", "shared", "peft"),
    ("separate / peft", "separate", "peft"),
)


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """``label -> {median, q1, q3}`` of the per-round step-time ratios, plus ``checks``: max |logit diff| of
    shared vs separate and ours vs peft, and the number of A products shared / reused per step."""
    separate, theirs, peft_diff = prepare(args, "lora")
    shared_model = copy.deepcopy(separate.model)
    share_lora_inputs(shared_model)
    shared = Side(shared_model, separate.batch)
    with torch.no_grad():
        separate.model.eval(), shared.model.eval()
        shared.model(**shared.batch)  # learns the groups
        coordinator = next(m.shared_inputs for m in shared.model.modules() if hasattr(m, "shared_inputs"))
        before = (coordinator.shared, coordinator.reused)
        gap = (
            (shared.model(**shared.batch).logits - separate.model(**separate.batch).logits).abs().max().item()
        )
        per_step = (coordinator.shared - before[0], coordinator.reused - before[1])
    for side in (separate, shared, theirs):
        side.model.train()
    samples = interleaved(
        {"shared": shared.train_step, "separate": separate.train_step, "peft": theirs.train_step}, args.rounds
    )
    results: dict[str, dict[str, float]] = {
        "checks": {
            "shared_vs_separate_max_logit_diff": gap,
            "ours_vs_peft_max_logit_diff": peft_diff,
            "shared_products_per_forward": per_step[0],
            "reused_per_forward": per_step[1],
        }
    }
    for label, name, reference in RATIOS:
        results[label] = paired_ratio(samples, name, reference)
    return results


def main(argv: list[str] | None = None) -> None:
    from benchmarks.__main__ import build_parser

    parser = build_parser("python -m benchmarks.shared_input", __doc__)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = run(args)
    checks = results["checks"]
    print(f"LoRA all-linear r=8, {args.layers} layers, hidden {args.hidden}, batch {args.batch}x{args.seq}, "
          f"{args.rounds} rounds, {args.threads} threads")  # fmt: skip
    print(f"  shared vs separate: max |logit diff| {checks['shared_vs_separate_max_logit_diff']:.2e}; "
          f"ours vs peft {checks['ours_vs_peft_max_logit_diff']:.2e}; per forward "
          f"{checks['shared_products_per_forward']} shared A products, {checks['reused_per_forward']} reuses")  # fmt: skip
    print("| train step time ratio | median | quartiles |\n|---|---|---|")
    for label, _, _ in RATIOS:
        r = results[label]
        print(f"| {label} | {r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |")


if __name__ == "__main__":
    main()
