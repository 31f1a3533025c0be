"""Why lightning_peft/methods/lora/kernels.py writes LoRA's thin matmuls the way it does.

Each row times one rank-r product of a LoRA linear layer in two operand layouts that compute the same numbers:
the one autograd's ``linear`` (and so a module-composed LoRA) uses, and the one the fused kernel uses.
Both variants of a row run interleaved, round by round, and the median of the per-round ratios is printed
(kernel / module; < 1: the kernel's layout is faster).

Usage: python -m benchmarks.lora_kernel_layouts [--tokens 256] [--in-features 512] [--out-features 1365] [--r 8]
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.measure import interleaved, median_seconds, paired_ratio


def rows(tokens: int, d_in: int, d_out: int, r: int) -> dict[str, tuple]:
    """``name -> (module-composition layout, kernel layout)``, each a no-argument function."""
    generator = torch.Generator().manual_seed(0)
    x, g = torch.randn(tokens, d_in, generator=generator), torch.randn(tokens, d_out, generator=generator)
    A, B = torch.randn(r, d_in, generator=generator), torch.randn(d_out, r, generator=generator)
    h, h_t = x @ A.t(), (A @ x.t()).contiguous()
    return {
        "forward: x A^T": (lambda: x @ A.t(), lambda: A @ x.t()),
        "backward: grad of A's output, g B": (lambda: g @ B, lambda: B.t() @ g.t()),
        "backward: grad of B": (lambda: h.t() @ g, lambda: h_t @ g),
        "backward: grad of A": (lambda: h.t() @ x, lambda: h_t @ x),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--in-features", type=int, default=512)
    parser.add_argument("--out-features", type=int, default=1365)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(
        f"tokens {args.tokens}, in {args.in_features}, out {args.out_features}, r {args.r}, {args.threads} threads"
    )
    print("| product | module layout us | kernel layout us | kernel / module |\n|---|---|---|---|")
    for name, (module, kernel) in rows(args.tokens, args.in_features, args.out_features, args.r).items():
        samples = interleaved({"module": module, "kernel": kernel}, args.rounds, warmup=10)
        times = median_seconds(samples)
        ratio = paired_ratio(samples, "kernel", "module")["median"]
        print(f"| {name} | {times['module'] * 1e6:.1f} | {times['kernel'] * 1e6:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
