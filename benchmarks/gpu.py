"""The GPU benchmark: one prepared run of every speed feature on a 1-3 B Llama-shaped model in bf16, ours beside
Hugging Face peft, tokens/s and peak memory measured side by side in one process.

Rows (all-linear, rank ``--rank``, alpha 2 x rank, AdamW; the base in ``--dtype``, the adapters in fp32 on both
sides, as both libraries make them on a half-precision base):

- **lora**, **dora**: ours and peft with the same adapter weights (ours, perturbed from init so that B != 0, loaded
  into peft with peft's own ``set_peft_model_state_dict``); the max |logit difference| is checked first.
- **qlora**: ours ``QLoRA`` (NF4, double quantization, compute in ``--dtype``) against peft's LoRA on the same base
  quantized by the same bitsandbytes call (so the same codes: checked by the logits).
- **compile**: the lora row's two models, each also called through ``torch.compile`` (``--backend``), the four
  steps interleaved in one run: compiled / eager for each, and ours compiled / peft compiled; the compiled loss
  (forward + backward, no step) is checked against the eager one first.
- **packing**: ``CausalLMModule`` training on variable-length examples (16..512 tokens), padded
  batches as ``SFTDataModule`` makes them against ``SFTDataModule(packing=True)``'s rows: real tokens/s each, and
  the token-weighted loss of a pass both ways (packed rows of ``--max-length``, ``batch x seq`` tokens a batch).
- **chunked_loss**: ``CausalLMModule`` with and without ``loss_chunk_size``: step time and the step's peak memory.

Timing: the steps of a row run round by round in one process (``benchmarks.measure.interleaved``, a device
synchronise closing each step), and every ratio is the median of per-round ratios, with quartiles. Peak memory
(CUDA only): ``torch.cuda.max_memory_allocated`` during one steady-state step, above what was allocated before it
(activations, gradients, the optimizer's transients: what the step adds to the resident model and state).

Usage:
    python -m benchmarks.gpu --out gpu.json                  # CUDA: 1.1 B (TinyLlama's shape), 4 x 1024 tokens
    python -m benchmarks.gpu --size 3b --rows lora qlora     # 3.2 B (Llama 3.2 3B's shape, 32 k vocabulary)
    python -m benchmarks.gpu --device cpu --dtype float32 --size tiny --batch 2 --seq 64 --rounds 2 --backend eager
    bash benchmarks/gpu_device.sh run                        # on a lent GPU machine: CUDA tests, then this
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.measure import interleaved, median_seconds, paired_ratio
from lightning_peft import inject
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.methods import LoRA, QLoRA

#: Llama shapes: TinyLlama 1.1 B, Llama 3.2 3B (with a 32 k vocabulary), and a tiny one for CPU runs.
SIZES = {
    "1b": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
           "num_key_value_heads": 4},
    "3b": {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 28, "num_attention_heads": 24,
           "num_key_value_heads": 8},
    "tiny": {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2},
}  # fmt: skip
ROWS = (
    "lora",
    "dora",
    "qlora",
    "packing",
    "chunked_loss",
    "compile",
)  # compile last: its compilation takes longest


def llama_config(args: argparse.Namespace) -> dict:
    return {
        "model_type": "llama", "vocab_size": args.vocab, "max_position_embeddings": max(2048, args.seq, args.max_length),
        **SIZES[args.size],
    }  # fmt: skip


def base_model(args: argparse.Namespace) -> nn.Module:
    """The base model, random weights (seed 0), built on the device in ``--dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = llama_config(args)
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=args.dtype).train()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_peak_gib(step: Callable[[], None], device: torch.device) -> float | None:
    """GiB allocated above the level before one steady-state ``step`` at its highest (CUDA); ``None`` elsewhere."""
    if device.type != "cuda":
        return None
    step()  # the first call also allocates the optimizer state, which then stays resident
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**30


def model_gib(model: nn.Module) -> float:
    """GiB of the model's parameters and buffers (each storage once): the resident model."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values()) / 2**30


class Side:
    """A model, its AdamW on the trainable parameters, a fixed random batch, and its synchronised step."""

    def __init__(self, model: nn.Module, args: argparse.Namespace) -> None:
        self.model, self.device = model, args.device
        self.optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
        self.batch = {"input_ids": ids.to(args.device), "labels": ids.to(args.device)}

    def step(self) -> None:
        self.model(**self.batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        synchronize(self.device)

    def logits(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(input_ids=self.batch["input_ids"]).logits.float()


def pair(args: argparse.Namespace, row: str) -> tuple[Side, Side, float]:
    """Ours and peft's models of ``row`` (lora, dora, qlora) with the same adapter weights, and the max |logit
    difference| between them (eval mode)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from lightning_peft.core.quantization import quantize

    dtype_name = str(args.dtype).removeprefix("torch.")
    kwargs = {"r": args.rank, "alpha": 2 * args.rank, "target_modules": "all-linear"}
    base = base_model(args)
    ours_model, theirs_model = copy.deepcopy(base), base
    if row == "qlora":
        inject(ours_model, QLoRA(**kwargs, compute_dtype=dtype_name))
        quantize(theirs_model, "all-linear", compute_dtype=args.dtype)
    else:
        inject(ours_model, LoRA(**kwargs, use_dora=row == "dora"))
    theirs_model = get_peft_model(
        theirs_model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", use_dora=row == "dora")
    )  # fmt: skip
    with torch.no_grad():  # non-trivial adapters: LoRA's B = 0 at init would hide a wrong update
        generator = torch.Generator().manual_seed(2)
        for p in ours_model.parameters():
            if p.requires_grad:
                p.add_(0.02 * torch.randn(p.shape, generator=generator, dtype=p.dtype).to(p.device))
    with tempfile.TemporaryDirectory() as directory:
        save_adapter(ours_model, directory)
        set_peft_model_state_dict(theirs_model, load_file(Path(directory) / "adapter_model.safetensors"))
    trained = [sum(p.numel() for p in m.parameters() if p.requires_grad) for m in (ours_model, theirs_model)]
    if trained[0] != trained[1]:
        raise RuntimeError(
            f"{row}: ours trains {trained[0]} parameters, peft {trained[1]}; the configs differ"
        )
    ours, theirs = Side(ours_model, args), Side(theirs_model, args)
    for side in (ours, theirs):
        side.model.eval()
    diff = (ours.logits() - theirs.logits()).abs().max().item()
    for side in (ours, theirs):
        side.model.train()
    return ours, theirs, diff


def tokens_per_s(tokens: int, samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: tokens / seconds for name, seconds in median_seconds(samples).items()}


def versus_peft(args: argparse.Namespace, row: str) -> dict:
    ours, theirs, diff = pair(args, row)
    samples = interleaved({"ours": ours.step, "peft": theirs.step}, args.rounds)
    result = {
        "max_logit_diff": diff, "tokens_per_s": tokens_per_s(args.batch * args.seq, samples),
        "ours_over_peft": paired_ratio(samples, "ours", "peft"),
        "step_peak_gib": {"ours": step_peak_gib(ours.step, args.device), "peft": step_peak_gib(theirs.step, args.device)},
        "model_gib": {"ours": model_gib(ours.model), "peft": model_gib(theirs.model)},
    }  # fmt: skip
    return result


def compiled(args: argparse.Namespace) -> dict:
    """The lora row's models eager and compiled, the four steps interleaved."""
    ours, theirs, _ = pair(args, "lora")
    sides = {"ours_eager": ours, "peft_eager": theirs}
    for name, side in (("ours", ours), ("peft", theirs)):
        twin = copy.copy(side)  # the same parameters, optimizer and batch
        twin.model = torch.compile(side.model, backend=args.backend)
        sides[f"{name}_compiled"] = twin
    for name, side in (("ours", ours), ("peft", theirs)):
        # The loss of one forward + backward (no optimizer step) both ways: the check reuses the training graphs,
        # so no inference graph is compiled (minutes on a 1 B model).
        losses = []
        for model in (side.model, sides[f"{name}_compiled"].model):
            loss = model(**side.batch).loss
            loss.backward()
            side.optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
        if abs(losses[0] - losses[1]) > args.compile_atol:
            raise RuntimeError(f"{name}: compiled loss {losses[1]:.6f} differs from eager {losses[0]:.6f}")
    for side in sides.values():
        for _ in range(args.warmup):  # compiles forward and backward, untimed
            side.step()
    samples = interleaved({name: side.step for name, side in sides.items()}, args.rounds)
    return {
        "tokens_per_s": tokens_per_s(args.batch * args.seq, samples),
        "ours_compiled_over_eager": paired_ratio(samples, "ours_compiled", "ours_eager"),
        "peft_compiled_over_eager": paired_ratio(samples, "peft_compiled", "peft_eager"),
        "ours_compiled_over_peft_compiled": paired_ratio(samples, "ours_compiled", "peft_compiled"),
    }


def lm_module(args: argparse.Namespace, **kwargs) -> nn.Module:
    """A ``CausalLMModule`` on the benchmark's Llama shape, on the device, all-linear LoRA (seed 0)."""
    from lightning_peft.app.tasks import CausalLMModule
    from lightning_peft.app.tokenization import BYTE_LEVEL

    module = CausalLMModule(
        model_config=llama_config(args),
        tokenizer_name_or_path=BYTE_LEVEL,
        max_length=args.max_length,
        **kwargs,
    )
    torch.manual_seed(0)
    with torch.device(args.device):  # built where it trains: a 1 B model's random init is slow on a CPU
        module.configure_model()
    module.model.to(dtype=args.dtype)
    torch.manual_seed(1)  # the same LoRA initialisation on every side
    inject(module.model, LoRA(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    return module.train()


def module_step(module: nn.Module, batches: list[dict], device: torch.device) -> Callable[[], None]:
    """benchmarks/packing.py's pass over ``batches`` (forward, backward, AdamW step each), then a device synchronise."""
    from benchmarks.packing import one_pass

    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-4)
    one = one_pass(module, batches, optimizer)

    def step() -> None:
        one()
        synchronize(device)

    return step


def on(device: torch.device, batch: dict) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def packing(args: argparse.Namespace) -> dict:
    """Padded batches against packed rows over the same examples (one timed call: a pass over all of them)."""
    from benchmarks.packing import token_mean_loss, variable_length_examples
    from lightning_peft.app.datamodules import SFTDataModule, collate_packed, pack_examples
    from lightning_peft.app.tokenization import BYTE_LEVEL

    examples = variable_length_examples(args.examples, 16, 512, seed=0)
    data = SFTDataModule(tokenizer_name_or_path=BYTE_LEVEL)
    data.tokenizer = data.load_tokenizer()
    shuffled = random.Random(1).sample(
        examples, len(examples)
    )  # the training loader shuffles padded examples
    padded = [
        on(args.device, data.collate(shuffled[i : i + args.batch]))
        for i in range(0, len(shuffled), args.batch)
    ]
    rows = pack_examples(examples, args.max_length)
    rows_per_batch = max(1, args.batch * args.seq // args.max_length)
    packed = [
        on(args.device, collate_packed(rows[i : i + rows_per_batch], data._pad_id()))
        for i in range(0, len(rows), rows_per_batch)
    ]
    sides = {"padded": (lm_module(args), padded), "packed": (lm_module(args), packed)}
    losses = {}
    for name, (module, batches) in sides.items():
        module.model.eval()
        losses[name] = token_mean_loss(module, batches)
        module.model.train()
    samples = interleaved(
        {name: module_step(m, b, args.device) for name, (m, b) in sides.items()}, args.rounds
    )
    real = sum(len(e["input_ids"]) for e in examples)
    return {
        "loss": losses, "real_tokens": real, "tokens_per_s": tokens_per_s(real, samples),
        "packed_speedup": paired_ratio(samples, "padded", "packed"),  # padded time / packed time
    }  # fmt: skip


def chunked_loss(args: argparse.Namespace) -> dict:
    """The plain LM loss against ``loss_chunk_size=--chunk``, same weights and batch."""
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = on(args.device, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    modules = {"plain": lm_module(args), "chunked": lm_module(args, loss_chunk_size=args.chunk)}
    with torch.no_grad():
        losses = {name: module.loss(batch).item() for name, module in modules.items()}
    steps = {name: module_step(module, [batch], args.device) for name, module in modules.items()}
    peaks = {name: step_peak_gib(step, args.device) for name, step in steps.items()}
    samples = interleaved(steps, args.rounds)
    return {
        "loss": losses, "step_peak_gib": peaks, "tokens_per_s": tokens_per_s(args.batch * args.seq, samples),
        "chunked_over_plain": paired_ratio(samples, "chunked", "plain"),
    }  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, dict]:
    """``row -> results`` for each of ``args.rows``; a row that fails is reported and the others still run."""
    measures = {"lora": versus_peft, "dora": versus_peft, "qlora": versus_peft}
    measures |= {"compile": lambda a, _: compiled(a), "packing": lambda a, _: packing(a)}
    measures["chunked_loss"] = lambda a, _: chunked_loss(a)
    results: dict[str, dict] = {}
    for row in args.rows:
        try:
            results[row] = measures[row](args, row)
        except (
            Exception
        ) as error:  # one row failing (a missing bitsandbytes CUDA build, say) must not lose the rest
            results[row] = {"error": f"{type(error).__name__}: {error}"}
        print(f"  {row}: {json.dumps(results[row], default=str)}", flush=True)
        if args.device.type == "cuda":
            torch.cuda.empty_cache()
    return results


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, dict]) -> str:
    """The rows as a markdown table: tokens/s, ratios (median, quartiles) and peak memory."""
    lines = ["| row | tokens/s (a / b) | ratio a / b: median (quartiles) | step peak GiB (a / b) | check |",
             "|---|---|---|---|---|"]  # fmt: skip
    spec = {
        "lora": ("ours", "peft", "ours_over_peft"), "dora": ("ours", "peft", "ours_over_peft"),
        "qlora": ("ours", "peft", "ours_over_peft"), "chunked_loss": ("chunked", "plain", "chunked_over_plain"),
        "compile": ("ours_compiled", "peft_compiled", "ours_compiled_over_peft_compiled"),
        "packing": ("padded", "packed", "packed_speedup"),
    }  # fmt: skip
    for row, r in results.items():
        if "error" in r:
            lines.append(f"| {row} | failed: {r['error'][:200]} | | | |")
            continue
        a, b, key = spec[row]
        ratio = r[key]
        peaks = r.get("step_peak_gib", {})
        check = (
            f"max logit diff {r['max_logit_diff']:.2e}" if "max_logit_diff" in r
            else f"loss {r['loss'][a]:.5f} / {r['loss'][b]:.5f}" if "loss" in r
            else f"ours compiled/eager {r['ours_compiled_over_eager']['median']:.3f}, "
                 f"peft {r['peft_compiled_over_eager']['median']:.3f}"
        )  # fmt: skip
        lines.append(
            f"| {row} ({a} / {b}) | {r['tokens_per_s'][a]:,.0f} / {r['tokens_per_s'][b]:,.0f} | "
            f"{ratio['median']:.3f} ({ratio['q1']:.3f}-{ratio['q3']:.3f}) | "
            f"{_fmt(peaks.get(a), '.2f')} / {_fmt(peaks.get(b), '.2f')} | {check} |"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="1b", help="the Llama shape")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--device", type=torch.device, default=torch.device("cuda"))
    parser.add_argument(
        "--dtype", type=lambda s: getattr(torch, s), default=torch.bfloat16, help="base dtype"
    )
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds (each: one step of every setup)")
    parser.add_argument("--rows", nargs="*", choices=ROWS, default=list(ROWS))
    parser.add_argument("--backend", default="inductor", help="torch.compile backend of the compile row")
    parser.add_argument("--warmup", type=int, default=2, help="compile row: untimed steps per setup")
    parser.add_argument(
        "--compile-atol", type=float, default=0.02, help="compile row: max |loss diff| (bf16)"
    )
    parser.add_argument("--examples", type=int, default=64, help="packing row: examples per pass")
    parser.add_argument("--max-length", type=int, default=1024, help="packing row: tokens per packed row")
    parser.add_argument("--chunk", type=int, default=1024, help="chunked_loss row: loss_chunk_size")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: pass --device cpu (with --size tiny) for a CPU run")
    name = torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else "cpu"
    import peft
    import transformers

    header = (
        f"{name}; torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}; "
        f"Llama {args.size} ({SIZES[args.size]['num_hidden_layers']} layers, hidden {SIZES[args.size]['hidden_size']}), "
        f"{args.dtype} base, LoRA all-linear r={args.rank}, batch {args.batch}x{args.seq}, {args.rounds} rounds"
    )  # fmt: skip
    print(header, flush=True)
    results = run(args)
    print(table(results))
    if args.out is not None:
        args.out.write_text(json.dumps({"setup": header, "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
