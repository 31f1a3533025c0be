"""The measurements, one function each; timings interleave every setup round by round in one process.

The machine this runs on is shared, so no absolute time is trusted: each round runs one step of every setup in
turn, and only ratios of medians are reported (load hits every setup of a round alike).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from benchmarks import flops
from benchmarks.models import Shape, build_model, make_batch, method_catalogue, virtual_tokens
from lightning_peft import count_parameters, inject, merge
from lightning_peft.formats.peft_directory import save_adapter
from lightning_peft.methods import PEFTMethod
from lightning_peft.methods.prompt.virtual_tokens import VirtualTokens

FULL = "full"  # full fine-tuning: the reference of every training ratio
BASE = "base"  # the base model, untouched: the reference of every inference ratio


class Setup:
    """A model prepared one way (``full``, ``base`` or a method), its optimizer, and how to train/infer."""

    def __init__(self, args: argparse.Namespace, name: str, merged: bool = False) -> None:
        self.name = name
        self.model = build_model(args).train()
        self.method: PEFTMethod | None = None
        if name not in (FULL, BASE):
            self.method = method_catalogue(args.model)[name]()
            inject(self.model, self.method)
            if merged:
                merge(self.model)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
        self.batch = make_batch(args, self.model)
        self.inputs = {k: v for k, v in self.batch.items() if k != "labels"}

    def loss(self) -> torch.Tensor:
        loss = self.model(**self.batch).loss
        extra = self.method.extra_loss(self.model, "default") if self.method is not None else None
        return loss if extra is None else loss + extra

    def train_step(self) -> None:
        self.loss().backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def infer(self) -> None:
        with torch.no_grad():
            self.model(**self.inputs)


def unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def per_token_adapter_params(model: nn.Module) -> int:
    """Trainable weights that run on every token: all trainable ones but the soft prompts (see flops.py)."""
    prompt_params = {id(p) for m in model.modules() if isinstance(m, VirtualTokens) for p in m.parameters()}
    return sum(p.numel() for p in unique_params(model) if p.requires_grad and id(p) not in prompt_params)


def ideal_step_flops(
    args: argparse.Namespace, shape: Shape, model: nn.Module, method: PEFTMethod | None
) -> int:
    """benchmarks/flops.py's FLOPs of one training step of ``model`` (``method`` injected, or ``None`` for full
    fine-tuning), ``shape`` being the base model's."""
    extra_query, extra_key = virtual_tokens(method) if method is not None else (0, 0)
    return flops.train_step_flops(
        linear_params=shape.linear_params, adapter_params=0 if method is None else per_token_adapter_params(model),
        batch=args.batch, seq=args.seq, attn_dim=shape.attn_dim, layers=shape.layers, full=method is None,
        extra_query=extra_query, extra_key=extra_key,
    )  # fmt: skip


def adapter_file(model: nn.Module) -> dict[str, int]:
    """Bytes of ``adapter_model.safetensors`` written by save_adapter, next to trainable params x element size."""
    with tempfile.TemporaryDirectory() as directory:
        save_adapter(model, directory)
        file_bytes = (Path(directory) / "adapter_model.safetensors").stat().st_size
        header = int.from_bytes((Path(directory) / "adapter_model.safetensors").read_bytes()[:8], "little")
    trainable = sum(p.numel() * p.element_size() for p in unique_params(model) if p.requires_grad)
    # The file holds the header (8-byte length + JSON) and the tensors peft expects: for soft prompts that is the
    # prompt encoder's output (n x d), not the encoder's weights, so it may be smaller than the trainable params.
    return {"file_bytes": file_bytes, "tensor_bytes": file_bytes - 8 - header, "param_bytes": trainable}


def saved_activation_bytes(setup: Setup) -> int:
    """Bytes of the tensors autograd holds for backward at the end of one forward (parameters excluded, each
    storage once). Tensors saved by a graph that is dropped before the loss exists (e.g. a detached side
    computation) are freed by then and not counted."""
    param_storages = {p.untyped_storage().data_ptr() for p in unique_params(setup.model)}
    saved: list[weakref.ref[torch.Tensor]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = setup.loss()
    alive: dict[int, int] = {}
    for ref in saved:
        tensor = ref()
        if tensor is not None and tensor.untyped_storage().data_ptr() not in param_storages:
            alive[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    tensor = None  # no reference of ours may keep a storage alive through backward
    loss.backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return sum(alive.values())


def grad_and_optimizer_bytes(setup: Setup) -> dict[str, int]:
    """Gradient bytes and AdamW state bytes after one step (the state exists from the first step on)."""
    setup.loss().backward()
    grads = sum(p.grad.nbytes for p in unique_params(setup.model) if p.grad is not None)
    setup.optimizer.step()
    state = sum(
        t.nbytes for s in setup.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    setup.optimizer.zero_grad(set_to_none=True)
    return {"grad_bytes": grads, "optimizer_bytes": state}


def counted_flops(setup: Setup) -> int:
    """FLOPs torch actually dispatches for forward + backward (matmuls, attention, convolutions)."""
    with FlopCounterMode(display=False) as counter:
        setup.loss().backward()
    setup.optimizer.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def interleaved(
    steps: dict[str, Callable[[], None]], rounds: int, warmup: int = 1, settle: int = 1
) -> dict[str, list[float]]:
    """Seconds of one call of each function per round, for ``rounds`` rounds (after ``warmup`` untimed rounds).

    In a round every function gets its turn: ``settle`` untimed calls, then one timed call, so what is timed is
    a steady-state call (a training loop runs the same step back to back), not the first call after another
    setup has churned the caches and the allocator. Round ``k`` starts at the ``k``-th function and wraps
    around, so every function also runs at every position of the order equally often.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for round_ in range(warmup + rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            for _ in range(settle):
                steps[name]()
            start = time.perf_counter()
            steps[name]()
            if round_ >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def paired_ratio(samples: dict[str, list[float]], name: str, reference: str) -> dict[str, float]:
    """``name``'s time over ``reference``'s, round by round: the median and quartiles of those ratios.

    Both ran within the same round, seconds apart, so a slow spell of a shared machine scales both; the median
    of per-round ratios cancels it where a ratio of overall medians would not.
    """
    ratios = sorted(a / b for a, b in zip(samples[name], samples[reference], strict=True))
    q1, median, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
    return {"median": median, "q1": q1, "q3": q3}


def median_seconds(samples: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(times) for name, times in samples.items()}


def status_mib(field: str) -> float:
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(field + ":"))
    return int(line.split()[1]) / 1024  # kB


def _peak_of(args: argparse.Namespace, name: str) -> dict[str, float]:
    torch.set_num_threads(args.threads)
    baseline = status_mib("VmRSS")  # interpreter + torch + transformers, no model yet
    setup = Setup(args, name)
    ready = status_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark: measure the steps only
    for _ in range(2):  # the first step also allocates the gradients and AdamW's state
        setup.train_step()
    peak = status_mib("VmHWM")
    return {"model_mib": ready - baseline, "peak_mib": peak, "peak_above_baseline_mib": peak - baseline}


def in_forked_child(measure: Callable[[], dict[str, float]], label: str) -> dict[str, float]:
    """``measure()`` run in a process forked from this one, its JSON-able result handed back. The caller forks
    before running any torch op, so no thread pool is forked; each child spares a fresh interpreter's ~10 s
    import."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as answer:
        pid = os.fork()
        if pid == 0:  # the child: measure, write, leave without running the parent's cleanup
            code = 1
            try:
                Path(answer.name).write_text(json.dumps(measure()))
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(
                f"peak-memory child for {label} failed (exit {os.waitstatus_to_exitcode(status)})"
            )
        return json.loads(Path(answer.name).read_text())


def peak_children(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """Peak memory of each setup in its own forked process (:func:`in_forked_child`)."""
    return {name: in_forked_child(lambda name=name: _peak_of(args, name), name) for name in names}


def process_peaks(args: argparse.Namespace, names: list[str]) -> dict[str, dict[str, float]]:
    """Run :func:`peak_children` in a fresh interpreter, so no peak mixes with this process's own memory."""
    argv = [sys.executable, "-m", "benchmarks", "--peak-child", ",".join(names), "--model", args.model,
            "--hidden", str(args.hidden), "--layers", str(args.layers), "--batch", str(args.batch),
            "--seq", str(args.seq), "--threads", str(args.threads)]  # fmt: skip
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    done = subprocess.run(argv, capture_output=True, text=True, cwd=root, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"peak-memory process failed: {done.stderr.strip().splitlines()[-3:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def trainable(model: nn.Module) -> dict[str, float]:
    counts = count_parameters(model)
    return {
        "trainable": int(counts["trainable"]),
        "total": int(counts["total"]),
        "trainable_percent": counts["trainable_percent"],
    }
