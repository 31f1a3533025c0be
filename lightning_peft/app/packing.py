"""The model side of packed batches (several examples per row, ``position_ids`` restarting with each, no
``attention_mask``; the rows are built by :func:`~lightning_peft.app.datamodules.pack_examples`): whether a batch
is packed under a mask, and the probe that a model keeps packed examples apart
(:class:`~lightning_peft.app.tasks.CausalLMModule` runs both)."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from lightning_peft.core import transformers_compat as hf
from lightning_peft.core.injection import injection_record, unwrap


def restarts_inside_mask(position_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
    """Whether ``position_ids`` ``(B, T)`` fail to count up by 1 between two neighbouring tokens that
    ``attention_mask`` ``(B, T)`` both keeps: packed examples (left or right padding alone never does this)."""
    kept = attention_mask.bool()
    neighbours = kept[:, 1:] & kept[:, :-1]  # (B, T-1)
    return bool((neighbours & (position_ids.diff(dim=-1) != 1)).any())


def check_packing_isolation(model: nn.Module, length: int = 6) -> None:
    """Refuse packed batches unless ``model`` keeps packed examples apart, as it runs them (``position_ids``
    restarting at 0, no ``attention_mask``, ``use_cache=False``), checked on a probe rather than by family name:
    whether a family isolates depends on the transformers release and on the attention implementation.

    The probe (eval mode, no grad, random token ids): a row ``[a | b]`` of two examples of ``length`` tokens.
    Changing ``a``'s tokens must leave ``b``'s logits unchanged (up to ``1e-5`` of their largest magnitude: no
    attention crosses the boundary), and ``b``'s logits in the row must equal ``b`` run alone (up to
    ``max(1e-4, 16 eps)`` of it, ``eps`` of the model's dtype: the positions restart). Soft-prompt methods are
    refused first: their virtual tokens belong to a row, not to each example in it.

    Raises:
        ValueError: a soft-prompt adapter is injected, ``forward`` takes no ``position_ids``, or the probe fails;
            the message says which and what to set instead.
    """
    name = type(unwrap(model)).__name__
    record = injection_record(model)
    soft = sorted(
        f"'{n}' ({m.name})" for n, m in (record.methods.items() if record else ()) if m.modifies_inputs
    )
    if soft:
        raise ValueError(
            f"packing: adapter {', '.join(soft)} adds virtual tokens to every row (a soft prompt before it, or a "
            "key/value prefix), and a packed row holds several examples: only the first would follow the prompt, "
            "and a prefix cache switches off transformers' packed-sequence mask. Soft-prompt methods (prompt "
            "tuning, P-tuning, prefix tuning, P-tuning v2, UniPELT) train unpacked: set data.init_args.packing: false."
        )
    if "position_ids" not in inspect.signature(unwrap(model).forward).parameters:
        raise ValueError(
            f"packing: {name}.forward takes no position_ids, so it cannot tell where one packed example ends and "
            "the next begins: they would attend to each other. Set data.init_args.packing: false for this model."
        )
    embeddings = model.get_input_embeddings().weight  # device and compute dtype (never a quantized tensor)
    g = torch.Generator().manual_seed(0)
    first, other, second = (
        torch.randint(0, embeddings.shape[0], (1, length), generator=g).to(embeddings.device)
        for _ in range(3)
    )
    positions = torch.arange(length, device=embeddings.device)[None]  # (1, length)
    packed = torch.cat([positions, positions], dim=1)  # (1, 2 * length): 0..length-1 twice

    def logits(ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()  # (1, L, vocab)

    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        with torch.no_grad():
            in_row = logits(torch.cat([first, second], dim=1), packed)[:, length:]  # (1, length, vocab)
            after_other = logits(torch.cat([other, second], dim=1), packed)[:, length:]
            alone = logits(second, positions)
    finally:
        for m, training in modes.items():
            m.training = training
    scale = alone.abs().max().item()
    leak = (in_row - after_other).abs().max().item()
    shift = (in_row - alone).abs().max().item()
    where = (
        f"{name} (transformers {hf.VERSION}, attn_implementation="
        f"{getattr(unwrap(model).config, '_attn_implementation', None)!r})"
    )
    if leak > 1e-5 * scale:
        raise ValueError(
            f"packing: {where} lets packed examples attend to each other: an example's logits changed by up to "
            f"{leak:.2e} when only the example before it in the row changed. It does not take example boundaries "
            "from position_ids. Set data.init_args.packing: false (or try another attn_implementation)."
        )
    if shift > max(1e-4, 16 * torch.finfo(embeddings.dtype).eps) * scale:
        raise ValueError(
            f"packing: {where} gives a packed example other logits than the same example alone (max |diff| "
            f"{shift:.2e}): it does not restart its positions where position_ids restart. Set "
            "data.init_args.packing: false for this model."
        )
