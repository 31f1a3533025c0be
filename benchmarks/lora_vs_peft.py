"""LoRA: lightning-peft vs Hugging Face peft, measured side by side in one run.

Same base model (a Llama built from a config, fixed seed), same LoRA config, same batches. For each
implementation: injection time, parameter bytes added, training step time (forward + backward + AdamW step) and
inference forward time, merged forward time, and whether both give the same outputs. Timings interleave the
two implementations round by round so machine noise hits both alike; the ratio column is ours / peft (< 1 is
faster/smaller).

Usage: python benchmarks/lora_vs_peft.py [--hidden 512] [--layers 4] [--rank 16] [--steps 20] [--dora]
Needs `peft` (pip install -e '.[test]').
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import count_parameters, inject, merge
from lightning_peft.methods import LoRA


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3, num_hidden_layers=args.layers,
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--dora", action="store_true")
    args = parser.parse_args()

    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(max(1, torch.get_num_threads()))
    ids = torch.randint(0, 2048, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))

    models, inject_s, added = {}, {}, {}
    for name in ("ours", "peft"):
        model = build(args)
        before = param_bytes(model)
        start = time.perf_counter()
        if name == "ours":
            inject(
                model, LoRA(r=args.rank, alpha=2 * args.rank, target_modules="all-linear", use_dora=args.dora)
            )
        else:
            config = LoraConfig(
                r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", use_dora=args.dora
            )
            model = get_peft_model(model, config)
        inject_s[name] = time.perf_counter() - start
        added[name] = param_bytes(model) - before
        models[name] = model

    # Identical adapter weights in both, so outputs must agree.
    # (DoRA magnitudes are left alone: both initialise them to the same base-weight row norms.)
    ours_sd = {k: v for k, v in models["ours"].state_dict().items() if "lora_A" in k or "lora_B" in k}
    peft_sd = {
        k.removeprefix("base_model.model."): v for k, v in models["peft"].state_dict().items() if "lora_" in k
    }
    with torch.no_grad():
        for key, value in ours_sd.items():
            torch.manual_seed(hash(key) % 2**31)
            value.normal_(std=0.02)
            peft_sd[key].copy_(value)
    with torch.no_grad():
        max_diff = (models["ours"](ids).logits - models["peft"](ids).logits).abs().max().item()

    optimizers = {
        n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
        for n, m in models.items()
    }

    def train_step(name: str) -> None:
        model, opt = models[name], optimizers[name]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def infer(name: str) -> None:
        with torch.no_grad():
            models[name](ids)

    results: dict[str, dict[str, list[float]]] = {n: {"train": [], "infer": []} for n in models}
    for name in models:  # warm-up
        train_step(name)
        infer(name)
    for _ in range(args.steps):
        for name in models:
            results[name]["train"] += timed(lambda name=name: train_step(name), 1)
            models[name].eval()
            results[name]["infer"] += timed(lambda name=name: infer(name), 1)
            models[name].train()

    merge(models["ours"])
    models["peft"].merge_adapter()
    merged = {n: timed(lambda n=n: infer(n), args.steps) for n in models}

    def row(label: str, ours: float, theirs: float, unit: str) -> None:
        print(f"| {label} | {ours:.4g} {unit} | {theirs:.4g} {unit} | {ours / theirs:.3f} |")

    counts = count_parameters(models["ours"])
    print(f"\nLlama hidden={args.hidden} layers={args.layers}, LoRA r={args.rank} all-linear"
          f"{' + DoRA' if args.dora else ''}, batch {args.batch}x{args.seq}, {args.steps} rounds, "
          f"{torch.get_num_threads()} threads; trainable {counts['trainable']:,} ({counts['trainable_percent']:.2f}%)")  # fmt: skip
    print(f"max |logits ours - peft| with identical adapter weights: {max_diff:.2e}\n")
    print("| measure | lightning-peft | peft | ratio |\n|---|---|---|---|")
    row("inject", inject_s["ours"] * 1e3, inject_s["peft"] * 1e3, "ms")
    row("parameter bytes added", added["ours"] / 1e6, added["peft"] / 1e6, "MB")
    for key, label in (("train", "train step (median)"), ("infer", "forward, unmerged (median)")):
        row(
            label,
            statistics.median(results["ours"][key]) * 1e3,
            statistics.median(results["peft"][key]) * 1e3,
            "ms",
        )
    row(
        "forward, merged (median)",
        statistics.median(merged["ours"]) * 1e3,
        statistics.median(merged["peft"]) * 1e3,
        "ms",
    )


if __name__ == "__main__":
    main()
