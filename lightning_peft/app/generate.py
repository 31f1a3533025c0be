"""``lightning-peft generate``: a trained adapter's answers to your own prompts, from the training config.

Usage::

    lightning-peft generate --config configs/sft_tiny_llama.yaml --ckpt_path $CKPT --prompt "What is LoRA?"

The YAML rebuilds the LightningModule and its adapter (as ``lightning-peft export`` does), the checkpoint
supplies the adapter's weights, and each prompt is encoded as the config's data module encodes prompts (its chat
template when it has one, else BOS + the prompt; for a seq2seq config, the prompt as the encoder's input) and
answered greedily, as ``predict`` does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from lightning_peft.app.datamodules import encode_prompt, encode_seq2seq_example
from lightning_peft.app.export import build_cli, config_parser, load_adapter_checkpoint
from lightning_peft.app.tasks import PromptResponseModule, Seq2SeqLMModule
from lightning_peft.integrations.callback import PEFTCallback


@torch.no_grad()
def generate(
    config: str | os.PathLike,
    ckpt_path: str | os.PathLike | None,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The responses to ``prompts`` of the model the config builds, with the checkpoint's adapter
    (``ckpt_path=None``: the freshly injected adapter, i.e. the base model's own answers).

    Raises:
        ValueError: the config's model is not a :class:`~lightning_peft.app.tasks.CausalLMModule` or
            :class:`~lightning_peft.app.tasks.Seq2SeqLMModule`.
    """
    cli = build_cli(config, overrides)
    module = cli.model
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback))
    if not isinstance(module, PromptResponseModule):
        raise ValueError(
            f"generate needs a causal LM or seq2seq config (model: lightning_peft.app.tasks.CausalLMModule or "
            f"Seq2SeqLMModule, e.g. configs/sft_tiny_llama.yaml); {config} builds a {type(module).__name__}."
        )
    if ckpt_path is not None:
        load_adapter_checkpoint(module, callback, ckpt_path)
    module.eval()
    # The data module owns the prompt format (its tokenizer's chat template, use_chat_template): as in training.
    datamodule = cli.datamodule
    if datamodule is not None:
        cli.trainer.strategy.connect(module)  # a data module without a tokenizer of its own asks the module's
        datamodule.trainer = cli.trainer
    tokenizer = datamodule.load_tokenizer() if datamodule is not None else module.tokenizer
    use_chat_template = getattr(datamodule, "use_chat_template", True)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    responses = []
    for prompt in prompts:
        if isinstance(module, Seq2SeqLMModule):  # the encoder's input, as Seq2SeqDataModule encodes it
            ids = encode_seq2seq_example(tokenizer, prompt, None, module.max_length)[0]
        else:
            ids = encode_prompt(tokenizer, prompt, use_chat_template)
        input_ids = torch.tensor([ids], device=module.device)
        generated = module.model.generate(
            input_ids=input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=max_new_tokens or module.max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=pad_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        responses.append(
            tokenizer.decode(module.response_ids(generated, input_ids)[0], skip_special_tokens=True)
        )
    return responses


def main(argv: Sequence[str] | None = None, prog: str = "lightning-peft generate") -> list[str]:
    parser = config_parser(prog, "Answer prompts with a trained adapter (greedy decoding, as predict).")
    parser.add_argument(
        "--ckpt_path", default=None, help="A checkpoint of that run (omit: the untrained adapter)."
    )
    parser.add_argument("--prompt", action="append", required=True, help="A prompt; repeat for several.")
    parser.add_argument(
        "--max_new_tokens", type=int, default=None, help="Default: the module's max_new_tokens."
    )
    args, overrides = parser.parse_known_args(argv)
    responses = generate(args.config, args.ckpt_path, args.prompt, args.max_new_tokens, overrides)
    for prompt, response in zip(args.prompt, responses, strict=True):
        print(f"prompt: {prompt}\nresponse: {response}\n")
    return responses
