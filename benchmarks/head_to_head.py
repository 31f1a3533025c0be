"""lightning-peft vs Hugging Face peft on identical configs: same base model, same batch, same adapter weights.

The adapter weights are made non-trivial (random), saved with our ``save_adapter`` and loaded into the peft
model with peft's own ``set_peft_model_state_dict``, so both compute the same function (checked: max |logits
difference|). Training steps and forwards of the two alternate round by round in one process; the ratio is
ours / peft (< 1: we are faster), the median of per-round ratios.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.measure import interleaved, median_seconds, paired_ratio
from benchmarks.models import VIRTUAL_TOKENS, build_model, make_batch
from lightning_peft import count_parameters, inject
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.methods import IA3, LoRA, PEFTMethod, PromptTuning


def pairs() -> dict[str, tuple[Callable[[], PEFTMethod], Callable[[], object]]]:
    """``name -> (our method, peft config)``, identical hyperparameters (Llama module names)."""
    from peft import IA3Config, LoraConfig, PromptTuningConfig

    ia3_targets = ["k_proj", "v_proj", "down_proj"]
    return {
        "lora": (
            lambda: LoRA(r=8, alpha=16, target_modules="all-linear"),
            lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
        ),
        "dora": (
            lambda: LoRA(r=8, alpha=16, target_modules="all-linear", use_dora=True),
            lambda: LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_dora=True),
        ),
        "lora_qv": (
            lambda: LoRA(r=8, alpha=16, target_modules=["q_proj", "v_proj"]),
            lambda: LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ),
        "ia3": (
            lambda: IA3(target_modules=ia3_targets, feedforward_modules=["down_proj"]),
            lambda: IA3Config(target_modules=ia3_targets, feedforward_modules=["down_proj"]),
        ),
        "prompt_tuning": (
            lambda: PromptTuning(num_virtual_tokens=VIRTUAL_TOKENS),
            lambda: PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL_TOKENS),
        ),
    }


class Side:
    """One implementation's model, optimizer and batch."""

    def __init__(self, model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
        self.model = model.train()
        self.batch = batch
        self.inputs = {k: v for k, v in batch.items() if k != "labels"}
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def train_step(self) -> None:
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer(self) -> None:
        with torch.no_grad():
            self.model(**self.inputs)


def prepare(args: argparse.Namespace, name: str) -> tuple[Side, Side, float]:
    from peft import get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    ours_method, peft_config = pairs()[name]
    ours = inject(build_model(args), ours_method())
    theirs = get_peft_model(build_model(args), peft_config())
    with torch.no_grad():  # non-trivial adapters (LoRA's B = 0 and IA3's l = 1 at init would hide bugs)
        generator = torch.Generator().manual_seed(2)
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    with tempfile.TemporaryDirectory() as directory:
        save_adapter(ours, directory)
        # (peft reports soft-prompt keys as "unexpected" though it loads them: the logits check below decides)
        set_peft_model_state_dict(theirs, load_file(Path(directory) / "adapter_model.safetensors"))
    batch = make_batch(args, ours)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        # peft's prompt tuning also returns the virtual tokens' logits, ours only the real tokens': compare those
        seq = batch["input_ids"].shape[1]
        diff = (ours(**batch).logits[:, -seq:] - theirs(**batch).logits[:, -seq:]).abs().max().item()
    if count_parameters(ours)["trainable"] != sum(p.numel() for p in theirs.parameters() if p.requires_grad):
        raise RuntimeError(f"{name}: ours and peft train different numbers of parameters; configs differ")
    return Side(ours, batch), Side(theirs, batch), diff


def run(args: argparse.Namespace, names: list[str] | None = None) -> dict[str, dict[str, float]]:
    """``name -> {train_ratio, infer_ratio, max_logit_diff, trainable, ...}``: ours / peft, medians of the
    per-round ratios of interleaved runs (``train_ratio_iqr``: their quartiles). ``names``: default all pairs."""
    results = {}
    for name in names or pairs():
        try:
            ours, theirs, diff = prepare(args, name)
        except (RuntimeError, ValueError) as error:  # one pair failing must not lose the others
            print(f"  vs peft {name}: failed: {error}", flush=True)
            continue
        train = interleaved({"ours": ours.train_step, "peft": theirs.train_step}, args.rounds * 2)
        ours.model.eval(), theirs.model.eval()
        infer = interleaved({"ours": ours.infer, "peft": theirs.infer}, args.rounds * 2)
        train_ratio = paired_ratio(train, "ours", "peft")
        results[name] = {
            "trainable": int(count_parameters(ours.model)["trainable"]),
            "max_logit_diff": diff,
            "train_ours_ms": median_seconds(train)["ours"] * 1e3,
            "train_peft_ms": median_seconds(train)["peft"] * 1e3,
            "train_ratio": train_ratio["median"],
            "train_ratio_iqr": (train_ratio["q1"], train_ratio["q3"]),
            "infer_ratio": paired_ratio(infer, "ours", "peft")["median"],
        }
        q1, q3 = results[name]["train_ratio_iqr"]
        print(
            f"  vs peft {name}: train {results[name]['train_ratio']:.3f} (quartiles {q1:.3f}-{q3:.3f}), "
            f"infer {results[name]['infer_ratio']:.3f}",
            flush=True,
        )
    return results


def main(argv: list[str] | None = None) -> None:
    """``python -m benchmarks.head_to_head [--methods lora lora_qv] [--rounds 20] [benchmark options]``: only the
    comparison with peft (each pair runs ``2 x rounds`` interleaved rounds), printed as a table."""
    from benchmarks.__main__ import build_parser
    from benchmarks.report import peft_table

    parser = build_parser("python -m benchmarks.head_to_head", __doc__)
    parser.add_argument("--pairs", nargs="*", default=None, help="alias of --methods")
    args = parser.parse_args(argv)
    names = args.pairs if args.pairs is not None else args.methods
    unknown = sorted(set(names or ()) - set(pairs()))
    if unknown:
        parser.error(f"no peft pair for {unknown}; the pairs are {sorted(pairs())}")
    torch.set_num_threads(args.threads)
    print(peft_table(run(args, names)))


if __name__ == "__main__":
    main()
