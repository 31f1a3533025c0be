"""Optimizers that treat LoRA's two factors differently: LoRA+ and LoRA-FA.

**LoRA+** (Hayou et al. 2024, https://arxiv.org/abs/2402.12354): with one learning rate for both factors, the
feature-learning update of a wide layer is dominated by ``A`` while ``B`` (which starts at zero) learns too
slowly; giving ``B`` a learning rate ``loraplus_lr_ratio`` times larger (the paper suggests 2^4 = 16) fixes that
and speeds training up to ~2x at the same cost. LoRA on embeddings gets its own (small) ``loraplus_lr_embedding``.

**LoRA-FA** (Zhang et al. 2023, https://arxiv.org/abs/2308.03303): ``A`` is frozen at its initialisation and only
``B`` trains, so backward no longer keeps the layer's full input for ``A``'s gradient (activation memory falls
from ``in`` to ``r`` values per token and layer). Plain training of ``B`` alone would follow the gradient of a
rank-``r`` problem; instead ``B``'s gradient is projected so that the update ``s * dB @ A`` is the closest
(Frobenius) rank-``r`` step to full fine-tuning's gradient ``g_W = s * g_B``-space: ``g_B <- g_B (A A^T)^-1 / s^2``
(the LoRA-FA/LoRA-Pro projection), then an AdamW step (Kingma & Ba's efficient form, decoupled decay).

Both work on a model, not on a flat list of tensors: which tensor is ``A``, ``B`` or an embedding factor is read
from the LoRA layers that hold them, so names (and wrappers such as FSDP or ``torch.compile`` that rename them)
do not matter. From YAML they are ordinary ``optimizer:`` entries; ``lightning-peft`` passes them the model
because they declare ``takes_module = True`` (see ``lightning_peft/app/cli.py``)::

    optimizer:
      class_path: lightning_peft.methods.lora.LoRAPlusAdamW
      init_args: {lr: 0.0002, loraplus_lr_ratio: 16}

In Python, with any optimizer class: ``torch.optim.AdamW(loraplus_param_groups(model, lr=2e-4))``.
Numerics follow Hugging Face ``peft``'s ``create_loraplus_optimizer`` and ``create_lorafa_optimizer``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lightning_peft.core.adapter_layer import AdapterLayer
from lightning_peft.methods.lora.layers import LoraLinear

#: Normalization layers whose weights, like biases, are never weight-decayed.
_NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)


def _require_module(params: Any, who: str) -> nn.Module:
    if isinstance(params, nn.Module):
        return params
    raise TypeError(
        f"{who} needs the model, not a list of tensors: it reads which tensor is LoRA's A or B from the layers "
        f"that hold them. Pass the model itself ({who}(model, lr=...)); in a LightningCLI config use "
        "lightning-peft's CLI, which passes the model to optimizers that declare takes_module = True."
    )


def _roles(model: nn.Module) -> dict[int, str]:
    """``id(parameter) -> attribute`` (``lora_A``, ``lora_B``, ``lora_embedding_A``, ...) for every adapter tensor."""
    roles: dict[int, str] = {}
    for module in model.modules():
        if isinstance(module, AdapterLayer):
            for attr in module.adapter_attrs:
                container = getattr(module, attr, None)
                if isinstance(container, nn.Module):
                    roles.update((id(p), attr) for p in container.parameters())
    return roles


def _not_decayed(model: nn.Module) -> set[int]:
    """Biases and normalization weights: decaying them towards zero only hurts (the usual transformers rule)."""
    ids = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias" or isinstance(module, _NORM_TYPES) or type(module).__name__.endswith("Norm"):
                ids.add(id(param))
    return ids


def loraplus_param_groups(
    model: nn.Module,
    lr: float,
    loraplus_lr_ratio: float = 16.0,
    loraplus_lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """LoRA+ parameter groups of ``model``'s trainable tensors, for any ``torch.optim`` optimizer.

    Example:
        >>> import torch
        >>> from lightning_peft import inject
        >>> from lightning_peft.methods import LoRA
        >>> model = inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoRA(r=2, target_modules=["0"]))
        >>> groups = loraplus_param_groups(model, lr=1e-4, loraplus_lr_ratio=16)
        >>> [(g["name"], g["lr"]) for g in groups]
        [('lora_A', 0.0001), ('lora_B', 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)

    Args:
        model: The adapted model (after :func:`~lightning_peft.inject` or inside a LightningModule).
        lr: Learning rate of ``A`` and of other matrices that train (e.g. a ``modules_to_save`` head's weight).
        loraplus_lr_ratio: ``lr_B / lr_A`` (the paper: 16; larger for harder tasks, with a somewhat lower ``lr``).
            ``B``, DoRA magnitudes and every other 1-D trainable tensor (biases, norms) get ``lr * ratio``.
        loraplus_lr_embedding: Learning rate of both factors of LoRA on embeddings.
        weight_decay: Decay of every group except biases and normalization weights.

    Returns:
        Up to four groups, named ``lora_A``, ``lora_embedding``, ``lora_B``, ``lora_B_no_decay`` (empty ones left
        out; the names show in Lightning's ``LearningRateMonitor``).

    Raises:
        ValueError: ``lr`` or ``loraplus_lr_ratio`` is not positive, or the model has no trainable tensor.
    """
    if not lr > 0 or not loraplus_lr_ratio > 0 or not loraplus_lr_embedding >= 0:
        raise ValueError(
            f"LoRA+ needs lr > 0, loraplus_lr_ratio > 0 and loraplus_lr_embedding >= 0; got lr={lr!r}, "
            f"loraplus_lr_ratio={loraplus_lr_ratio!r}, loraplus_lr_embedding={loraplus_lr_embedding!r} "
            "(the paper's ratio is 16)."
        )
    roles, no_decay = _roles(model), _not_decayed(model)
    members: dict[str, list[nn.Parameter]] = {
        "lora_A": [],
        "lora_embedding": [],
        "lora_B": [],
        "lora_B_no_decay": [],
    }
    for param in model.parameters():
        if not param.requires_grad:
            continue
        role = roles.get(id(param), "")
        if role.startswith("lora_embedding"):
            members["lora_embedding"].append(param)
        elif role == "lora_B" or param.ndim == 1:  # vectors (magnitudes, biases, norms) learn like B
            members["lora_B_no_decay" if id(param) in no_decay else "lora_B"].append(param)
        else:
            members["lora_A"].append(param)
    if not any(members.values()):
        raise ValueError(
            "LoRA+ found no trainable tensor in the model: inject a LoRA adapter first (lightning_peft.inject or "
            "PEFTCallback) and build the optimizer after it."
        )
    settings = {
        "lora_A": (lr, weight_decay),
        "lora_embedding": (loraplus_lr_embedding, weight_decay),
        "lora_B": (lr * loraplus_lr_ratio, weight_decay),
        "lora_B_no_decay": (lr * loraplus_lr_ratio, 0.0),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in members.items()
        if params
    ]


class LoRAPlusAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` over :func:`loraplus_param_groups`: ``B`` learns ``loraplus_lr_ratio`` times faster.

    Example:
        >>> import torch
        >>> from lightning_peft import inject
        >>> from lightning_peft.methods import LoRA
        >>> model = inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoRA(r=2, target_modules=["0"]))
        >>> [group["lr"] for group in LoRAPlusAdamW(model, lr=1e-4, loraplus_lr_ratio=8).param_groups]
        [0.0001, 0.0008]

    Args:
        params: The adapted model (named ``params`` so LightningCLI treats this like any optimizer; the CLI of
            lightning-peft passes the LightningModule).
        lr: Learning rate of ``A`` (and of other trained matrices).
        loraplus_lr_ratio: ``lr_B / lr_A``.
        loraplus_lr_embedding: Learning rate of embedding LoRA factors.
        betas: AdamW's moment decay rates.
        eps: AdamW's epsilon.
        weight_decay: Decoupled decay of every group except biases and normalization weights.
        amsgrad: AdamW's AMSGrad variant.
    """

    takes_module: ClassVar[bool] = True

    def __init__(
        self,
        params: nn.Module,
        lr: float = 1e-3,
        loraplus_lr_ratio: float = 16.0,
        loraplus_lr_embedding: float = 1e-6,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        amsgrad: bool = False,
    ) -> None:
        model = _require_module(params, type(self).__name__)
        groups = loraplus_param_groups(model, lr, loraplus_lr_ratio, loraplus_lr_embedding, weight_decay)
        super().__init__(groups, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad)


def _refuse_ddp_expecting_gradients_for_a(model: nn.Module) -> None:
    """Lightning wraps the model in DDP before configure_optimizers, while every A still trained: DDP then waits
    for A's gradients, which never come, and fails at the second step naming unused parameters. Say why, first."""
    strategy = getattr(getattr(model, "_trainer", None), "strategy", None)
    wrapper = getattr(strategy, "model", None)
    if isinstance(wrapper, DistributedDataParallel) and not (
        wrapper.find_unused_parameters or getattr(wrapper, "static_graph", False)
    ):
        raise ValueError(
            "LoRAFAAdamW freezes LoRA's A factors, but DDP wrapped the model while they still trained and would wait "
            "for their gradients. Use `trainer.strategy: ddp_find_unused_parameters_true` (or "
            "DDPStrategy(find_unused_parameters=True) / static_graph=True)."
        )


class LoRAFAAdamW(torch.optim.Optimizer):
    """LoRA-FA: freezes every trainable LoRA ``A`` of the model and trains ``B`` with the projected gradient.

    Other trainable tensors (biases, ``modules_to_save`` heads) get the same AdamW step without projection.
    Construction sets ``requires_grad=False`` on the ``A`` factors (they stay in the adapter and its files). Under
    Lightning's DDP the model was wrapped while ``A`` still trained, so DDP must be told some parameters get no
    gradient: ``strategy: ddp_find_unused_parameters_true`` (refused early otherwise).

    Example:
        >>> import torch
        >>> from lightning_peft import inject
        >>> from lightning_peft.methods import LoRA
        >>> model = inject(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoRA(r=2, target_modules=["0"]))
        >>> optimizer = LoRAFAAdamW(model, lr=1e-4)
        >>> model[0].lora_A["default"].weight.requires_grad
        False

    Args:
        params: The adapted model (the LightningModule, from lightning-peft's CLI).
        lr: Learning rate.
        betas: Adam's moment decay rates.
        eps: Added to the root of the second moment (1e-6, as in peft's LoRA-FA and transformers' AdamW).
        weight_decay: Decoupled decay, applied after the Adam step.
        correct_bias: Adam's bias correction of both moments.

    Raises:
        ValueError: the model has no trainable LoRA adapter, or one on a layer LoRA-FA cannot project (embedding,
            convolution) or with DoRA (its magnitude's update is not a rank-r step of B), or Lightning's DDP
            wrapper expects a gradient for every A.
    """

    takes_module: ClassVar[bool] = True

    def __init__(
        self,
        params: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
        correct_bias: bool = True,
    ) -> None:
        model = _require_module(params, type(self).__name__)
        if not lr >= 0 or not all(0 <= b < 1 for b in betas) or not eps >= 0 or not weight_decay >= 0:
            raise ValueError(
                f"LoRAFAAdamW needs lr >= 0, betas in [0, 1), eps >= 0 and weight_decay >= 0; got lr={lr!r}, "
                f"betas={betas!r}, eps={eps!r}, weight_decay={weight_decay!r}."
            )
        #: ``B -> (A, s)``: B's gradient is projected with its frozen A and the adapter's scale.
        self.projections: dict[torch.Tensor, tuple[torch.Tensor, float]] = {}
        frozen = []
        for name, layer in model.named_modules():
            if not isinstance(layer, AdapterLayer) or "lora_A" not in layer.adapter_attrs:
                continue
            for adapter in list(getattr(layer, "r", {})):
                factors = [
                    getattr(layer, a)[adapter]
                    for a in ("lora_A", "lora_embedding_A")
                    if adapter in getattr(layer, a)
                ]
                tensors = [t for f in factors for t in (f.parameters() if isinstance(f, nn.Module) else [f])]
                if not any(t.requires_grad for t in tensors):
                    continue  # an inactive or frozen adapter: not this optimizer's
                if not isinstance(layer, LoraLinear):
                    raise ValueError(
                        f"LoRAFAAdamW: {name} is a {type(layer).__name__} around {type(layer.base_layer).__name__}; "
                        "LoRA-FA projects B's gradient through a matrix A, so it supports LoRA on Linear (and "
                        "GPT-2 Conv1D) layers only. Leave this layer out (target_modules / exclude_modules) or use "
                        "LoRAPlusAdamW or torch.optim.AdamW."
                    )
                if adapter in layer.lora_magnitude_vector:
                    raise ValueError(
                        f"LoRAFAAdamW: adapter '{adapter}' of {name} uses DoRA; LoRA-FA's projection assumes the "
                        "update is s * B @ A alone. Set use_dora=False or use another optimizer."
                    )
                A, B = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
                self.projections[B] = (A, layer.scaling[adapter])
                frozen.append(A)
        _refuse_ddp_expecting_gradients_for_a(model)
        if not self.projections:
            raise ValueError(
                "LoRAFAAdamW found no trainable LoRA adapter in the model: inject LoRA first (lightning_peft.inject "
                "or PEFTCallback with lightning_peft.methods.LoRA) and build the optimizer after it."
            )
        for A in frozen:
            A.requires_grad_(False)  # no gradient for A: backward keeps (..., r) activations, not (..., in)
        trainable = [p for p in model.parameters() if p.requires_grad]
        defaults = {
            "lr": lr,
            "betas": betas,
            "eps": eps,
            "weight_decay": weight_decay,
            "correct_bias": correct_bias,
        }
        super().__init__(trainable, defaults)

    def projected_gradient(self, B: torch.Tensor) -> torch.Tensor:
        """``g_B (A A^T)^+ / s^2``, in float32 (the (r, r) Gram matrix is inverted, so bf16 would lose it)."""
        A, scaling = self.projections[B]
        A32 = A.detach().float()
        gram = A32 @ A32.T  # (r, in) @ (in, r) -> (r, r), symmetric positive (semi-)definite
        # The pseudo-inverse: a rank-deficient A (rows that became collinear) still gets a finite projection.
        inverse = torch.linalg.pinv(gram, hermitian=True)
        return ((B.grad.float() @ inverse) / scaling**2).to(B.grad.dtype)  # (out, r) @ (r, r) -> (out, r)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                grad = self.projected_gradient(param) if param in self.projections else param.grad
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"]
                if group["correct_bias"]:  # Adam's efficient form: both corrections folded into the step size
                    step_size *= math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                param.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                if group["weight_decay"] > 0:
                    param.add_(param, alpha=-group["lr"] * group["weight_decay"])
        return loss
