"""Chunked LM loss against the plain one: peak memory of the loss, and the LoRA training step, in one run.

The plain loss is what ``CausalLMModule`` computes without ``loss_chunk_size``: the model's own, i.e. the output
head over every token, the logits upcast to fp32 and transformers' shifted cross-entropy. The chunked loss is
``CausalLMModule(loss_chunk_size=...)``: the head and the cross-entropy over that many tokens at a time.

- **Loss peak**: bytes above the inputs while the loss alone runs forward and backward (final hidden states
  ``(tokens, hidden)`` requiring grad -> frozen head -> loss -> gradient of the hidden states), each side in its
  own forked process (resident-set high-water mark, reset before the step; glibc's mmap threshold fixed at 64 KiB
  so every large tensor is returned to the system when freed and the mark follows live tensors).
- **Step peak**: the same for a whole training step of the model (LoRA all-linear r=8, AdamW).
- **Step time**: both modules' training steps interleaved round by round; the median of per-round ratios.

Usage:
    python -m benchmarks.chunked_loss                 # vocab 32000, 2 x 1024 tokens, hidden 512, 4 layers
    python -m benchmarks.chunked_loss --chunk 512 --rounds 12 --threads 2
"""

from __future__ import annotations

import argparse
import ctypes
import json
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.measure import in_forked_child, interleaved, paired_ratio, status_mib
from lightning_peft import inject
from lightning_peft.app.tasks import CausalLMModule, chunked_causal_lm_loss
from lightning_peft.methods import LoRA

SIDES = ("plain", "chunked")


def model_config(args: argparse.Namespace) -> dict:
    return {
        "model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.hidden,
        "intermediate_size": args.hidden * 8 // 3, "num_hidden_layers": args.layers, "num_attention_heads": 8,
        "num_key_value_heads": 4, "max_position_embeddings": max(2048, args.seq),
    }  # fmt: skip


class Side:
    """One ``CausalLMModule`` (plain or chunked loss) on the same LoRA'd model weights, its optimizer and batch."""

    def __init__(self, args: argparse.Namespace, chunked: bool) -> None:
        torch.manual_seed(0)
        self.module = CausalLMModule(
            model_config=model_config(args),
            tokenizer_name_or_path="byte-level",  # not used: the batch is random token ids
            loss_chunk_size=args.chunk if chunked else None,
        )
        self.module.configure_model()
        inject(self.module.model, LoRA(r=8, alpha=16, target_modules="all-linear"))
        self.module.model.train()
        trainable = [p for p in self.module.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        self.batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        self.head = self.module.model.get_output_embeddings()
        hidden = torch.randn(args.batch, args.seq, args.hidden, generator=torch.Generator().manual_seed(2))
        self.hidden = hidden.requires_grad_(True)

    def train_step(self) -> None:
        self.module.loss(self.batch).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def loss_only(self) -> None:
        """The loss from fixed final hidden states through the (frozen) head, forward and backward."""
        labels = self.batch["labels"]
        if self.module.loss_chunk_size is None:
            logits = self.head(self.hidden)
            loss = self.module.model.loss_function(logits, labels, vocab_size=logits.shape[-1])
        else:
            loss = chunked_causal_lm_loss(self.hidden, labels, self.head, self.module.loss_chunk_size)
        loss.backward()
        self.hidden.grad = None


def _peak_above(step: Callable[[], None]) -> float:
    """MiB of resident memory above the level before ``step`` at its highest point (second call: the first one
    also allocates the optimizer state)."""
    step()
    ready = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark
    step()
    return status_mib("VmHWM") - ready


def _child(args: argparse.Namespace, side: str) -> dict[str, float]:
    ctypes.CDLL("libc.so.6").mallopt(
        -3, 64 * 1024
    )  # M_MMAP_THRESHOLD: large blocks mmapped, unmapped on free
    torch.set_num_threads(args.threads)
    setup = Side(args, side == "chunked")
    return {"loss_peak_mib": _peak_above(setup.loss_only), "step_peak_mib": _peak_above(setup.train_step)}


def peaks(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Each side's peaks in a process of its own, forked before this one runs any torch op."""
    return {side: in_forked_child(lambda side=side: _child(args, side), side) for side in SIDES}


def run(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Peaks per side, ``checks`` (both sides' loss and largest gradient difference, same weights and batch), and
    the ``step`` and ``loss`` time ratios chunked / plain."""
    results: dict[str, dict[str, float]] = peaks(args) if args.peaks else {}
    torch.set_num_threads(args.threads)
    sides = {name: Side(args, name == "chunked") for name in SIDES}
    losses, grads = {}, {}
    for name, side in sides.items():
        loss = side.module.loss(side.batch)
        loss.backward()
        losses[name] = loss.item()
        grads[name] = {n: p.grad for n, p in side.module.model.named_parameters() if p.grad is not None}
        side.optimizer.zero_grad(set_to_none=True)
    results["checks"] = {
        "loss_diff": abs(losses["plain"] - losses["chunked"]),
        "max_grad_diff": max((grads["plain"][n] - g).abs().max().item() for n, g in grads["chunked"].items()),
    }
    step = interleaved({name: side.train_step for name, side in sides.items()}, args.rounds)
    loss_only = interleaved({name: side.loss_only for name, side in sides.items()}, args.rounds)
    results["step"] = paired_ratio(step, "chunked", "plain")
    results["loss"] = paired_ratio(loss_only, "chunked", "plain")
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chunked_loss",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=1024, help="loss_chunk_size")
    parser.add_argument("--rounds", type=int, default=8, help="timed rounds (each: one call of every side)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-peaks", dest="peaks", action="store_false", help="skip the memory processes")
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of the table")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results))
        return
    tokens = args.batch * args.seq
    print(f"vocab {args.vocab}, {tokens} tokens ({args.batch}x{args.seq}), hidden {args.hidden}, {args.layers} "
          f"layers, LoRA all-linear r=8, loss_chunk_size {args.chunk}, {args.rounds} rounds, {args.threads} threads")  # fmt: skip
    checks = results["checks"]
    print(
        f"  chunked vs plain: |loss diff| {checks['loss_diff']:.2e}, max |grad diff| {checks['max_grad_diff']:.2e}"
    )
    print("| chunked / plain | ratio | quartiles or MiB |\n|---|---|---|")
    for key, label in (("loss_peak_mib", "loss peak memory"), ("step_peak_mib", "step peak memory")):
        if "plain" in results:
            plain, chunked = results["plain"][key], results["chunked"][key]
            print(f"| {label} | {chunked / plain:.3f} | {chunked:.0f} / {plain:.0f} MiB |")
    for key, label in (("loss", "loss time (forward + backward)"), ("step", "training step time")):
        r = results[key]
        print(f"| {label} | {r['median']:.3f} | {r['q1']:.3f}-{r['q3']:.3f} |")


if __name__ == "__main__":
    main()
