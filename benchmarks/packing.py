"""Padding-free SFT: packed rows against padded batches, tokens per second of LoRA training on variable lengths.

The same examples (lengths drawn uniformly from 16 to 512 tokens, the first quarter of each a prompt with label
-100) are trained on in two ways, through ``CausalLMModule.loss`` (the path ``lightning-peft fit`` takes) on a
Llama-shaped model with all-linear LoRA:

* padded: as ``SFTDataModule`` batches them, ``--batch`` examples per batch in shuffled order (as the training
  loader gives them), right-padded to the longest, with an ``attention_mask``;
* packed: ``SFTDataModule(packing=True)``'s rows (whole examples, greedily, in order, up to ``--max-length``
  tokens each; ``position_ids`` restart per example, no mask), ``--rows`` rows per batch.

One timed call is one pass (forward, backward, AdamW step per batch) over all the examples, so both sides train
on exactly the same tokens; the calls alternate round by round in one process and the ratio reported is the median
of the per-round ratios (padded time / packed time = packed tokens/s over padded tokens/s). Before timing, the
token-weighted mean loss of a pass is checked to be equal both ways (the two compute the same loss).

On a machine whose cores other processes share, pass ``--threads 1``: threads competing for busy cores make
the per-round ratios noise (measured on a 2-core VM at load ~8: 1.81x with 1 thread, quartiles 1.64-2.00; with
2 threads 0.64x, quartiles 0.27-0.94).

Usage:
    python -m benchmarks.packing                           # hidden 256, 4 layers, 48 examples, 5 rounds
    python -m benchmarks.packing --threads 1 --examples 32 # the measured run (~5 min on 2 shared cores)
    python -m benchmarks.packing --hidden 512 --examples 96 --rounds 9 --threads 16
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable

import torch

from benchmarks.measure import interleaved, median_seconds, paired_ratio
from lightning_peft import inject
from lightning_peft.app.datamodules import IGNORE_INDEX, SFTDataModule, collate_packed, pack_examples
from lightning_peft.app.tasks import CausalLMModule
from lightning_peft.app.tokenization import BYTE_LEVEL
from lightning_peft.methods import LoRA


def variable_length_examples(
    count: int, shortest: int, longest: int, seed: int
) -> list[dict[str, list[int]]]:
    """``count`` examples of uniformly random lengths in ``[shortest, longest]``; the first quarter is prompt."""
    rng = random.Random(seed)
    examples = []
    for _ in range(count):
        length = rng.randint(shortest, longest)
        ids = [rng.randrange(256) for _ in range(length)]
        prompt = max(1, length // 4)
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return examples


def llama_module(args: argparse.Namespace) -> CausalLMModule:
    config = {
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 8 // 3, "num_hidden_layers": args.layers,
        "num_attention_heads": max(1, args.hidden // 64), "num_key_value_heads": max(1, args.hidden // 128),
        "max_position_embeddings": args.max_length,
    }  # fmt: skip
    module = CausalLMModule(
        model_config=config, tokenizer_name_or_path=BYTE_LEVEL, max_length=args.max_length
    )
    module.configure_model()
    torch.manual_seed(0)  # the same LoRA initialisation on both sides
    inject(module.model, LoRA(r=8, alpha=16, target_modules="all-linear"))
    module.model.train()
    return module


def one_pass(
    module: CausalLMModule, batches: list[dict], optimizer: torch.optim.Optimizer
) -> Callable[[], None]:
    def run() -> None:
        for batch in batches:
            loss = module.loss(batch)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def token_mean_loss(module: CausalLMModule, batches: list[dict]) -> float:
    """The mean loss over every kept token of the pass (each batch's mean weighted by its kept tokens)."""
    total, tokens = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            kept = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += module.loss(batch).item() * kept
            tokens += kept
    return total / tokens


def run(args: argparse.Namespace) -> dict[str, float]:
    examples = variable_length_examples(args.examples, 16, 512, seed=0)
    data = SFTDataModule(tokenizer_name_or_path=BYTE_LEVEL)
    data.tokenizer = data.load_tokenizer()
    order = list(range(len(examples)))
    random.Random(1).shuffle(order)  # the training loader shuffles the padded examples
    shuffled = [examples[i] for i in order]
    padded = [data.collate(shuffled[i : i + args.batch]) for i in range(0, len(shuffled), args.batch)]
    rows = pack_examples(examples, args.max_length)
    packed = [collate_packed(rows[i : i + args.rows], data._pad_id()) for i in range(0, len(rows), args.rows)]
    real = sum(len(e["input_ids"]) for e in examples)
    slots = {
        name: sum(b["input_ids"].numel() for b in batches)
        for name, batches in (("padded", padded), ("packed", packed))
    }

    # Two copies of the same module (same seed, same LoRA init) so each side keeps its own optimizer state.
    sides = {"padded": (llama_module(args), padded), "packed": (llama_module(args), packed)}
    losses = {}
    for name, (module, batches) in sides.items():
        module.model.eval()
        losses[name] = token_mean_loss(module, batches)
        module.model.train()
    calls = {}
    for name, (module, batches) in sides.items():
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
        calls[name] = one_pass(module, batches, optimizer)
    samples = interleaved(calls, args.rounds, warmup=1, settle=0)
    seconds = median_seconds(samples)
    # paired_ratio(a, b) is a's time over b's: padded / packed is the packed speed-up in tokens/s.
    speedup = paired_ratio(samples, "padded", "packed")
    return {
        "real_tokens": real, "padded_slots": slots["padded"], "packed_slots": slots["packed"],
        "padded_batches": len(padded), "packed_batches": len(packed), "rows": len(rows),
        "padded_loss": losses["padded"], "packed_loss": losses["packed"],
        "padded_tokens_per_s": real / seconds["padded"], "packed_tokens_per_s": real / seconds["packed"],
        "speedup": speedup["median"], "speedup_q1": speedup["q1"], "speedup_q3": speedup["q3"],
    }  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.packing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--hidden", type=int, default=256, help="Llama hidden size (heads of 64)")
    parser.add_argument("--layers", type=int, default=4, help="Llama layers")
    parser.add_argument("--vocab", type=int, default=8192, help="vocabulary size of the Llama")
    parser.add_argument("--examples", type=int, default=48, help="examples per pass (lengths 16..512)")
    parser.add_argument("--batch", type=int, default=8, help="padded: examples per batch")
    parser.add_argument("--rows", type=int, default=2, help="packed: rows per batch")
    parser.add_argument("--max-length", type=int, default=512, help="packed: tokens per row")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each: one pass of either side)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    r = run(args)
    print(f"Llama hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, LoRA all-linear r=8; {args.examples} "
          f"examples of 16..512 tokens ({r['real_tokens']:,} tokens); {args.rounds} rounds, {args.threads} threads")  # fmt: skip
    print(f"  padded: {r['padded_batches']} batches of {args.batch}, {r['padded_slots']:,} token slots "
          f"({r['real_tokens'] / r['padded_slots']:.0%} real)")  # fmt: skip
    print(f"  packed: {r['rows']} rows of <= {args.max_length} in {r['packed_batches']} batches of {args.rows}, "
          f"{r['packed_slots']:,} token slots ({r['real_tokens'] / r['packed_slots']:.0%} real)")  # fmt: skip
    print(f"  token-mean loss of a pass: padded {r['padded_loss']:.6f}, packed {r['packed_loss']:.6f} "
          f"(|diff| {abs(r['padded_loss'] - r['packed_loss']):.1e})")  # fmt: skip
    print(f"  tokens/s: padded {r['padded_tokens_per_s']:,.0f}, packed {r['packed_tokens_per_s']:,.0f}")
    print(
        f"  packed / padded tokens/s: {r['speedup']:.2f}x (quartiles {r['speedup_q1']:.2f}-{r['speedup_q3']:.2f})"
    )


if __name__ == "__main__":
    main()
