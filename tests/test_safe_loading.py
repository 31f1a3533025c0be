"""Adapter directories and checkpoints from elsewhere: read as tensors and a validated config only, refused
clearly when wrong, and a refused load leaves the model bit for bit as it was."""

from __future__ import annotations

import builtins
import json
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from safetensors.torch import load_file, save_file

from lightning_peft import PEFTCallback, load_adapter, save_adapter
from lightning_peft.core.injection import inject, injection_record
from lightning_peft.formats.peft_directory import CONFIG_NAME, WEIGHTS_NAME
from lightning_peft.methods import LoRA, PrefixTuning, PromptTuning
from lightning_peft.testing.checks import randomise
from tests.test_callback import CausalLM, make_trainer, token_loader
from tests.tiny_models import tiny_bert_classifier, tiny_gpt2, tiny_llama, token_batch

QV = ["q_proj", "v_proj"]


def lora_dir(tmp_path: Path, **lora) -> Path:
    model = inject(tiny_llama(), LoRA(**{"r": 4, "alpha": 8, "target_modules": QV, **lora}))
    randomise(model)
    return save_adapter(model, tmp_path / "adapter")


def edit_config(directory: Path, **changes) -> None:
    path = directory / CONFIG_NAME
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def snapshot(model: torch.nn.Module) -> dict:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()),
    }


def assert_unchanged(model: torch.nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["modules"] == before["modules"] and after["grad"] == before["grad"]
    assert after["hooks"] == before["hooks"] and injection_record(model) is None
    assert after["state"].keys() == before["state"].keys()
    changed = [k for k in before["state"] if not torch.equal(after["state"][k], before["state"][k])]
    assert changed == []


# --- security -------------------------------------------------------------------------------------------------
def test_a_config_naming_a_tokenizer_with_code_never_runs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evil, marker = tmp_path / "evil_tokenizer", tmp_path / "code_ran"
    evil.mkdir()
    (evil / "tokenizer_config.json").write_text(
        json.dumps({"auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}, "tokenizer_class": "Evil"})
    )
    (evil / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\nclass EvilTokenizer: pass\n")
    monkeypatch.setattr(builtins, "input", lambda *args: "y")  # "run remote code?": yes
    model = inject(tiny_llama(), PromptTuning(num_virtual_tokens=4))
    randomise(model)
    directory = save_adapter(model, tmp_path / "adapter")
    edit_config(
        directory,
        prompt_tuning_init="TEXT",
        prompt_tuning_init_text="hello",
        tokenizer_name_or_path=str(evil),
    )
    loaded = load_adapter(tiny_llama(), directory)
    assert not marker.exists()
    ids = token_batch()
    torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)


def test_a_catastrophic_regex_in_a_config_is_refused_within_a_second(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path)
    for pattern in ("(.|.)*Z", "(a+)+$", "([a-z]+\\.)*q_proj"):
        edit_config(directory, target_modules=pattern)
        model = tiny_llama()
        before = snapshot(model)
        start = time.perf_counter()
        with pytest.raises(ValueError, match=r"target_modules.*exponential time.*list of module names"):
            load_adapter(model, directory)
        assert time.perf_counter() - start < 1.0
        assert_unchanged(model, before)
    edit_config(directory, target_modules=".*(", rank_pattern={})
    with pytest.raises(ValueError, match=r"not a valid regular expression"):
        load_adapter(tiny_llama(), directory)
    edit_config(directory, target_modules=QV, rank_pattern={"(q|q_)+proj": 2})
    with pytest.raises(ValueError, match=r"rank_pattern\[.*\]: .*exponential"):
        load_adapter(tiny_llama(), directory)


# --- configs: strict keys and types ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"use_rslroa": True}, r"unknown keys 'use_rslroa' \(did you mean 'use_rslora'\?\)"),
        ({"lora_alpah": 32}, r"'lora_alpah' \(did you mean 'lora_alpha'\?\)"),
        ({"use_rslora": "false"}, r"use_rslora must be bool, got 'false'"),
        ({"lora_alpha": None}, r"alpha must be float, got None"),
        ({"lora_alpha": "16"}, r"alpha must be float, got '16'"),
        ({"target_modules": 123}, r"target_modules must be .*got 123"),
        ({"r": 1e9}, r"rank must be an integer"),
        ({"layers_to_transform": [0]}, r"sets \['layers_to_transform'\].*not implement"),
        ({"peft_type": 7}, r"no 'peft_type' string"),
    ],
)
def test_config_values_are_checked_by_key_and_type_before_the_model_changes(
    tmp_path: Path, changes: dict, message: str
) -> None:
    directory = lora_dir(tmp_path)
    edit_config(directory, **changes)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message) as error:
        load_adapter(model, directory)
    assert str(directory) in str(error.value)
    assert_unchanged(model, before)


def test_keys_peft_writes_for_features_we_lack_are_accepted_unset(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path)
    edit_config(
        directory, layers_to_transform=None, use_qalora=False, target_parameters=[], peft_version="0.21"
    )
    reference = load_adapter(tiny_llama(), lora_dir(tmp_path / "again"))
    loaded = load_adapter(tiny_llama(), directory)
    ids = token_batch()
    torch.testing.assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{ not json", r"adapter_config.json is not valid UTF-8 JSON"),
        (b'{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "x": "\xff"}', r"is not valid UTF-8 JSON"),
        (b'["LORA", 4]', r"adapter_config.json holds a JSON list, not an object"),
    ],
)
def test_unreadable_configs_are_named(tmp_path: Path, content: bytes, message: str) -> None:
    directory = lora_dir(tmp_path)
    (directory / CONFIG_NAME).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_adapter(tiny_llama(), directory)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_unreadable_weights_are_named(tmp_path: Path, damage: str) -> None:
    directory = lora_dir(tmp_path)
    path = directory / WEIGHTS_NAME
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00junk" * 50}[damage])
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"{WEIGHTS_NAME} cannot be read .*Save the adapter again"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


# --- non-finite tensors ---------------------------------------------------------------------------------------
def test_non_finite_adapter_tensors_are_refused_on_load_unless_allowed(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path)
    tensors = load_file(directory / WEIGHTS_NAME)
    key = sorted(tensors)[0]
    tensors[key][0, 0] = float("nan")
    save_file(tensors, directory / WEIGHTS_NAME)
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"1 adapter tensors hold NaN or infinity, e.g. \['{key}'\]"):
        load_adapter(model, directory)
    assert_unchanged(model, before)
    loaded = load_adapter(model, directory, allow_non_finite=True)
    assert torch.isnan(loaded.state_dict()[_live_key(key)]).sum() == 1


def _live_key(peft_key: str) -> str:
    return peft_key.removeprefix("base_model.model.").replace(".weight", ".default.weight")


def test_save_adapter_refuses_non_finite_tensors_and_writes_nothing(tmp_path: Path) -> None:
    model = inject(tiny_llama(), LoRA(r=4, target_modules=QV))
    with torch.no_grad():
        next(p for p in model.parameters() if p.requires_grad)[0, 0] = float("inf")
    with pytest.raises(ValueError, match=r"save_adapter.*NaN or infinity.*nothing was written"):
        save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
    save_adapter(model, tmp_path / "adapter", allow_non_finite=True)
    assert torch.isinf(next(iter(load_file(tmp_path / "adapter" / WEIGHTS_NAME).values()))).any()


# --- a refused PiSSA load -------------------------------------------------------------------------------------
@pytest.mark.parametrize("fault", ["missing_tensor", "other_base"])
def test_a_refused_pissa_load_leaves_the_base_weights_bit_identical(tmp_path: Path, fault: str) -> None:
    directory = lora_dir(tmp_path, init_lora_weights="pissa")
    if fault == "missing_tensor":
        tensors = load_file(directory / WEIGHTS_NAME)
        del tensors[sorted(tensors)[-1]]
        save_file(tensors, directory / WEIGHTS_NAME)
        model = tiny_llama()
    else:
        model = tiny_llama(hidden_size=48, intermediate_size=96)  # same modules, other shapes
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"do not fit the injected LoRA"):
        load_adapter(model, directory)
    assert_unchanged(model, before)


# --- resuming -------------------------------------------------------------------------------------------------
def _checkpoint(tmp_path: Path, method: LoRA) -> Path:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    callback = PEFTCallback(method, target="model")
    make_trainer(tmp_path / "first", [callback, checkpoint], max_steps=2).fit(
        CausalLM(), token_loader(batches=2)
    )
    return tmp_path / "ckpt" / "last.ckpt"


def assert_resume_refused(tmp_path: Path, last: Path, message: str, module: CausalLM | None = None,
                          method: LoRA | None = None) -> None:  # fmt: skip
    """Resuming from ``last`` raises ValueError matching ``message`` before any training step."""
    module = module if module is not None else CausalLM()
    method = method if method is not None else LoRA(r=4, alpha=8, target_modules=QV)
    trainer = make_trainer(tmp_path / "resumed", [PEFTCallback(method, target="model")], max_steps=4)
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, token_loader(batches=2), ckpt_path=last)
    assert module.losses == []


@pytest.mark.parametrize(
    ("resumed_with", "message"),
    [
        (LoRA(r=8, alpha=32, target_modules=QV), r"alpha: checkpoint 8, callback 32"),
        (LoRA(r=4, alpha=8, target_modules=QV), r"r: checkpoint 8, callback 4"),
        (LoRA(r=8, alpha=8, target_modules=["q_proj"]), r"target_modules: checkpoint \['q_proj', 'v_proj'\]"),
    ],
)
def test_resume_with_other_hyperparameters_is_refused_before_training(
    tmp_path: Path, resumed_with: LoRA, message: str
) -> None:
    last = _checkpoint(tmp_path, LoRA(r=8, alpha=8, target_modules=QV))
    assert_resume_refused(tmp_path, last, rf"other LoRA settings.*{message}", method=resumed_with)


class DivergingLM(CausalLM):
    """A loss that turns NaN at the given step (as a diverged run's or an inf in the inputs would)."""

    def __init__(self, nan_at: int) -> None:
        super().__init__()
        self.nan_at = nan_at

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == self.nan_at else loss


def test_a_non_finite_loss_stops_training_and_the_last_checkpoint_stays_finite(tmp_path: Path) -> None:
    checkpoint = ModelCheckpoint(
        dirpath=tmp_path / "ckpt", save_last=True, save_top_k=-1, every_n_train_steps=1
    )
    trainer = make_trainer(tmp_path, [PEFTCallback(LoRA(r=4, target_modules=QV), target="model"), checkpoint],
                           max_steps=4)  # fmt: skip
    module = DivergingLM(nan_at=2)
    with pytest.raises(FloatingPointError, match=r"step 2 \(epoch 0\) has NaN/inf gradients in 8 trainable"):
        trainer.fit(module, token_loader(batches=4))
    assert trainer.global_step == 2
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2 and len(last["state_dict"]) == 8
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_non_finite_skip_drops_that_step_and_trains_on(tmp_path: Path) -> None:
    callback = PEFTCallback(LoRA(r=4, target_modules=QV), target="model", non_finite="skip")
    module = DivergingLM(nan_at=1)
    with pytest.warns(UserWarning, match=r"step 1 .*NaN/inf gradients.*the step is skipped"):
        make_trainer(tmp_path, [callback], max_steps=4).fit(module, token_loader(batches=5))
    assert len(module.losses) == 4  # the skipped step counts as a step
    assert all(p.abs().sum() > 0 for n, p in module.named_parameters() if "lora_B" in n)  # trained on
    assert all(torch.isfinite(p).all() for p in module.parameters())


def test_resume_from_a_checkpoint_holding_non_finite_adapters_is_refused(tmp_path: Path) -> None:
    last = _checkpoint(tmp_path, LoRA(r=4, alpha=8, target_modules=QV))
    checkpoint = torch.load(last, weights_only=True)
    key = sorted(checkpoint["state_dict"])[0]
    checkpoint["state_dict"][key][0, 0] = float("nan")
    torch.save(checkpoint, last)
    assert_resume_refused(tmp_path, last, rf"The checkpoint: 1 adapter tensors hold NaN.*\['{key}'\]")


# --- geometry at injection ------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", ["bert", "gpt2"])
def test_virtual_tokens_that_fill_a_learned_position_table_are_refused_at_injection(build: str) -> None:
    model = tiny_bert_classifier() if build == "bert" else tiny_gpt2()
    positions = model.config.max_position_embeddings if build == "bert" else model.config.n_positions
    before = snapshot(model)
    with pytest.raises(ValueError, match=rf"num_virtual_tokens={positions} fills all {positions} positions"):
        inject(model, PromptTuning(num_virtual_tokens=positions))
    assert_unchanged(model, before)
    inject(model, PromptTuning(num_virtual_tokens=positions - 8))  # room for 8 tokens of input
    assert injection_record(model) is not None


def test_a_rank_beyond_the_layer_width_warns_naming_the_layer() -> None:
    with pytest.warns(
        UserWarning, match=r"r=80 exceeds the width of 4 target layers \(e.g. .*q_proj: min\(in, out\) = 64\)"
    ):
        inject(tiny_llama(), LoRA(r=80, target_modules=QV))


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_adapter_names_that_cannot_be_keys_are_refused(name) -> None:
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"adapter_name=.*non-empty name without '\.'"):
        inject(model, LoRA(r=4, target_modules=QV), adapter_name=name)
    assert_unchanged(model, before)


class WiderLM(CausalLM):
    def __init__(self) -> None:
        super().__init__()
        self.model = tiny_llama(hidden_size=48, intermediate_size=96)


def test_resume_on_another_base_names_the_shapes_before_loading(tmp_path: Path) -> None:
    last = _checkpoint(tmp_path, LoRA(r=4, alpha=8, target_modules=QV))
    message = r"8 differ in shape .*q_proj.lora_A.default.weight \(4, 64\) vs \(4, 48\)"
    assert_resume_refused(tmp_path, last, message, module=WiderLM())


@pytest.mark.parametrize("method", [PromptTuning(num_virtual_tokens=60), PrefixTuning(num_virtual_tokens=60)])
def test_virtual_tokens_plus_an_input_beyond_the_positions_is_named_at_the_call(method) -> None:
    model = inject(tiny_bert_classifier(), method)  # 64 learned positions
    ids = torch.randint(0, 100, (2, 4))
    assert model(input_ids=ids).logits.shape == (2, 3)  # 60 + 4 fit
    with pytest.raises(
        ValueError, match=r"60 virtual tokens \+ 5 input tokens = 65 positions.* has 64 learned"
    ):
        model(input_ids=torch.randint(0, 100, (2, 5)))


def test_a_config_claiming_a_huge_rank_is_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    directory = lora_dir(tmp_path)  # r=4 in the file
    edit_config(directory, r=10**9)  # 64 * 10**9 floats per lora_A: 256 GB if it were allocated
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(
        ValueError, match=r"wrong shape \(file vs config and model\).*\(4, 64\) vs \(1000000000, 64\)"
    ):
        load_adapter(model, directory)
    assert_unchanged(model, before)


def test_a_truncated_checkpoint_is_named_when_resumed(tmp_path: Path) -> None:
    last = _checkpoint(tmp_path, LoRA(r=4, alpha=8, target_modules=QV))
    last.write_bytes(last.read_bytes()[:200])
    assert_resume_refused(
        tmp_path, last, rf"Checkpoint {last} cannot be read .*truncated or not a checkpoint"
    )


def test_qlora_takes_a_torch_dtype_for_its_compute_dtype() -> None:
    from lightning_peft.methods import QLoRA

    assert QLoRA(compute_dtype=torch.bfloat16).compute_dtype == "bfloat16"
    assert QLoRA(compute_dtype=torch.bfloat16) == QLoRA(compute_dtype="bfloat16")
    with pytest.raises(ValueError, match=r"compute_dtype='int8' must be one of"):
        QLoRA(compute_dtype=torch.int8)
