"""Tokenizers for the ready modules: any Hugging Face tokenizer, or a built-in byte-level one.

The byte-level tokenizer exists so that a causal LM built from a config (``CausalLMModule(model_config=...)``)
can be trained and tested offline with nothing downloaded: every UTF-8 byte is one token (ids 0-255, the byte
value itself) plus ``<s>`` (256), ``</s>`` (257) and ``<pad>`` (258). It has no merges, so sequences are as long as their UTF-8
encoding, and no chat template (pass one to :class:`~lightning_peft.app.datamodules.SFTDataModule` if you want
one). It is a real ``transformers`` fast tokenizer: ``save_pretrained`` writes a folder that
``AutoTokenizer.from_pretrained`` reads back.
"""

from __future__ import annotations

import os
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

#: The value of ``tokenizer_name_or_path`` that selects :func:`byte_level_tokenizer`.
BYTE_LEVEL = "byte-level"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (what ``pre_tokenizers.ByteLevel`` emits)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    shifted = [b for b in range(256) if b not in printable]
    chars = {b: chr(b) for b in printable}
    chars.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return chars


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """A 259-token tokenizer: token id = UTF-8 byte value, then ``<s>`` (256), ``</s>`` (257), ``<pad>`` (258).

    Returns:
        A fast tokenizer with ``bos_token``, ``eos_token`` and ``pad_token`` set and no chat template.
    """
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    # BPE with no merges: every byte-character stays its own token.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.name_or_path = BYTE_LEVEL
    return tokenizer


def pretrained_kwargs(name_or_path: str) -> dict[str, Any]:
    # A local folder must never trigger a hub lookup (offline machines, air-gapped clusters).
    return {"local_files_only": True} if os.path.isdir(name_or_path) else {}


def load_tokenizer(name_or_path: str) -> Any:
    """``"byte-level"`` -> :func:`byte_level_tokenizer`; anything else -> ``AutoTokenizer.from_pretrained``."""
    if name_or_path == BYTE_LEVEL:
        return byte_level_tokenizer()
    return AutoTokenizer.from_pretrained(name_or_path, **pretrained_kwargs(name_or_path))
