"""Checks for methods, yours included, and the tiny models they run on (no download).

``check_method(lambda: MyMethod(...), tmp_dir)`` runs every check a method of this package passes; see
:mod:`lightning_peft.testing.checks`. Needs nothing beyond lightning-peft's own dependencies.
"""

from lightning_peft.testing.checks import (
    FAMILIES,
    assert_checkpointing_gives_same_grads,
    assert_disable_gives_base,
    assert_init_is_identity,
    assert_merge_matches,
    assert_named_adapters_switch,
    assert_non_finite_merge_is_refused,
    assert_not_mergeable,
    assert_roundtrip,
    assert_trains_only_its_parameters,
    assert_trains_through_callback,
    assert_unload_restores_base,
    check_method,
    raises,
)
from lightning_peft.testing.models import VOCAB, tiny_bert_classifier, tiny_llama, token_batch

__all__ = [
    "FAMILIES",
    "VOCAB",
    "assert_checkpointing_gives_same_grads",
    "assert_disable_gives_base",
    "assert_init_is_identity",
    "assert_merge_matches",
    "assert_named_adapters_switch",
    "assert_non_finite_merge_is_refused",
    "assert_not_mergeable",
    "assert_roundtrip",
    "assert_trains_only_its_parameters",
    "assert_trains_through_callback",
    "assert_unload_restores_base",
    "check_method",
    "raises",
    "tiny_bert_classifier",
    "tiny_llama",
    "token_batch",
]
