"""QLoRA: what the 4-bit base costs and saves, on a Llama-shaped model built from a config (random init).

Measured:

1. bytes per quantized Linear weight: packed NF4 codes + block scales (+ double quantization of the scales);
2. memory of a training step (forward + backward + AdamW step) for full fine-tuning, LoRA and QLoRA (same
   rank, every block Linear), each in a fresh subprocess so peaks never mix: resident memory once the model is
   ready, and the peak resident memory (VmHWM) during the steps, its high-water mark reset after building (the
   fp32 model QLoRA quantizes from is not counted; it is reported apart). ``getrusage`` is not used: after
   fork+exec it reports the parent's peak;
3. step time QLoRA / LoRA, in one process with the two models' steps interleaved round by round, so that load
   from other processes on the machine hits both alike;
4. relative error of the logits (and of the weights) of the quantized model at init vs full precision, NF4 vs FP4;
5. why merging into the 4-bit base is refused: the share of a LoRA update that survives re-quantizing
   ``W_q + D`` (synthetic rank-16 updates ``D`` of a given size relative to ``W``).

Usage: python benchmarks/qlora_memory.py [--hidden 1024] [--layers 8] [--seq 256] [--steps 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lightning_peft import count_parameters, inject
from lightning_peft.core.quantization import dequantize_weight, quantize, weight_storage_bytes
from lightning_peft.methods import LoRA, QLoRA


def build(args: argparse.Namespace) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
        num_hidden_layers=args.layers, num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=1024,
    )  # fmt: skip
    return LlamaForCausalLM(config)


def adapted(args: argparse.Namespace, mode: str) -> LlamaForCausalLM:
    model = build(args).train()
    if mode == "lora":
        inject(model, LoRA(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    elif mode == "qlora":
        inject(model, QLoRA(r=args.rank, alpha=2 * args.rank, target_modules="all-linear"))
    return model


def batch(args: argparse.Namespace) -> torch.Tensor:
    return torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ids: torch.Tensor) -> float:
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return time.perf_counter() - start


def _status_mib(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def memory_child(args: argparse.Namespace) -> dict:
    """One setup in this fresh process: resident memory before, and peak during, `--memory-steps` AdamW steps."""
    import bitsandbytes  # noqa: F401  (loaded in every setup, so the library memory is the same baseline)

    torch.set_num_threads(args.threads)
    baseline = _status_mib("VmRSS")  # interpreter + torch + transformers + bitsandbytes, no model yet
    model = adapted(args, args.child)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    build_peak, ready = _status_mib("VmHWM"), _status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure the steps only
    ids = batch(args)
    for _ in range(args.memory_steps):  # the first step also allocates the gradients and AdamW's state
        train_step(model, optimizer, ids)
    counts = count_parameters(model)
    return {
        "params_total": counts["total"],
        "params_trainable": counts["trainable"],
        "baseline_mib": baseline,
        "model_mib": ready - baseline,
        "peak_during_steps_mib": _status_mib("VmHWM"),
        "peak_above_baseline_mib": _status_mib("VmHWM") - baseline,
        "peak_while_building_mib": build_peak,
    }


def timing_child(args: argparse.Namespace) -> dict:
    """Step times of LoRA and QLoRA, one step of each per round (after a warm-up round)."""
    torch.set_num_threads(args.threads)
    models = {mode: adapted(args, mode) for mode in ("lora", "qlora")}
    optimizers = {
        m: torch.optim.AdamW([p for p in x.parameters() if p.requires_grad]) for m, x in models.items()
    }
    ids = batch(args)
    times: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(args.steps + 1):
        for mode, model in models.items():
            times[mode].append(train_step(model, optimizers[mode], ids))
    return {mode: statistics.median(t[1:]) for mode, t in times.items()}


def run_child(mode: str, args: argparse.Namespace) -> dict:
    argv = [sys.executable, __file__, "--child", mode]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k != "child"]
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def storage(args: argparse.Namespace) -> dict:
    results = {}
    for label, double_quant in (("nf4_double_quant", True), ("nf4", False)):
        model = build(args)
        quantize(model, double_quant=double_quant)
        layers = [m for m in model.modules() if hasattr(getattr(m, "weight", None), "quant_state")]
        weights = sum(m.weight.quant_state.shape.numel() for m in layers)
        results[label] = {
            "bytes_per_weight": sum(weight_storage_bytes(m, include_tables=False) for m in layers) / weights,
            "bytes_per_weight_with_tables": sum(weight_storage_bytes(m) for m in layers) / weights,
            "quantized_weights": weights,
        }
    return results


def quantization_error(args: argparse.Namespace) -> dict:
    ids = batch(args)[:, :64]
    full = build(args).eval()
    weights = {n: m.weight.detach().clone() for n, m in full.named_modules() if n.endswith("proj")}
    with torch.no_grad():
        reference = full(input_ids=ids).logits
        errors = {}
        for quant_type in ("nf4", "fp4"):
            model = inject(build(args).eval(), QLoRA(r=args.rank, quant_type=quant_type))
            quantized = {n: dequantize_weight(model.get_submodule(n).base_layer) for n in weights}
            errors[quant_type] = {
                "logits": ((model(input_ids=ids).logits - reference).norm() / reference.norm()).item(),
                "weights": statistics.mean(
                    ((quantized[n] - w).norm() / w.norm()).item() for n, w in weights.items()
                ),
            }
    return errors


def merge_requantization(args: argparse.Namespace) -> dict:
    """Share of an update D kept when W_q + D is re-quantized to NF4: <Q(W_q + D) - W_q, D> / |D|^2."""
    import bitsandbytes as bnb

    model = build(args)
    quantize(model)
    W = dequantize_weight(model.model.layers[0].mlp.down_proj)  # W_q: already on the 4-bit grid
    g = torch.Generator().manual_seed(2)
    kept = {}
    for relative in (0.01, 0.05, 0.2):
        delta = torch.randn(W.shape[0], 16, generator=g) @ torch.randn(16, W.shape[1], generator=g)
        delta *= relative * W.norm() / delta.norm()
        codes, state = bnb.functional.quantize_4bit(W + delta, quant_type="nf4", compress_statistics=True)
        requantized = bnb.functional.dequantize_4bit(codes, state)
        kept[f"update_{relative:.0%}_of_W"] = {
            "kept": ((requantized - W) * delta).sum().item() / delta.square().sum().item(),
            "error_over_update": ((requantized - W - delta).norm() / delta.norm()).item(),
        }
    return kept


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4, help="timed rounds of interleaved LoRA/QLoRA steps")
    parser.add_argument("--memory-steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=["full", "lora", "qlora", "timing"], default=None)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(timing_child(args) if args.child == "timing" else memory_child(args)))
        return

    torch.set_num_threads(args.threads)
    results: dict = {"config": {k: v for k, v in vars(args).items() if k != "child"}}
    results["storage"] = storage(args)
    results["quantization_error"] = quantization_error(args)
    results["merge_requantization"] = merge_requantization(args)
    memory = results["memory"] = {mode: run_child(mode, args) for mode in ("full", "lora", "qlora")}
    step = results["step_s"] = run_child("timing", args)

    def ratio(key: str, a: str, b: str) -> float:
        return memory[a][key] / memory[b][key]

    results["ratios"] = {
        "peak_qlora_over_lora": ratio("peak_during_steps_mib", "qlora", "lora"),
        "peak_qlora_over_full": ratio("peak_during_steps_mib", "qlora", "full"),
        "peak_lora_over_full": ratio("peak_during_steps_mib", "lora", "full"),
        "peak_above_baseline_qlora_over_lora": ratio("peak_above_baseline_mib", "qlora", "lora"),
        "peak_above_baseline_qlora_over_full": ratio("peak_above_baseline_mib", "qlora", "full"),
        "model_qlora_over_lora": ratio("model_mib", "qlora", "lora"),
        "step_time_qlora_over_lora": step["qlora"] / step["lora"],
    }
    print(json.dumps(results, indent=2))

    s = results["storage"]["nf4_double_quant"]
    print(f"\nLlama-shaped: hidden {args.hidden}, {args.layers} layers, {memory['full']['params_total'] / 1e6:.1f} M "
          f"params ({s['quantized_weights'] / 1e6:.1f} M in block Linears); batch {args.batch} x {args.seq} tokens; "
          f"{args.threads} threads")  # fmt: skip
    print(f"bytes per quantized weight: NF4 + double quant {s['bytes_per_weight']:.4f} ({8 * s['bytes_per_weight']:.3f}"
          f" bits), NF4 alone {results['storage']['nf4']['bytes_per_weight']:.4f}")  # fmt: skip
    print("| setup | trainable params | model (MiB) | peak during step (MiB) | peak above baseline (MiB) |")
    print("|---|---|---|---|---|")
    for mode, r in memory.items():
        print(f"| {mode} | {r['params_trainable']:,} | {r['model_mib']:.0f} | {r['peak_during_steps_mib']:.0f} | "
              f"{r['peak_above_baseline_mib']:.0f} |")  # fmt: skip
    print(f"baseline (interpreter + libraries, no model): {memory['qlora']['baseline_mib']:.0f} MiB; "
          f"step time LoRA {step['lora']:.2f} s, QLoRA {step['qlora']:.2f} s")  # fmt: skip
    print("ratios:", {k: round(v, 3) for k, v in results["ratios"].items()})
    print("relative error at init:", json.dumps(results["quantization_error"]))
    print("merge by re-quantizing:", json.dumps(results["merge_requantization"]))


if __name__ == "__main__":
    main()
