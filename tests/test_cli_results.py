"""What ``lightning-peft fit`` / ``predict`` leave a person to look at: the test metrics after fit, the one-screen
summary, ``curves.png`` drawn from ``metrics.csv``, and predictions beside the checkpoint they came from."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lightning_peft.app.cli import cli_main
from lightning_peft.app.curves import plot_curves, read_curves
from tests.test_cli import TINY_BERT, _rank_zero_lines, tiny_config

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-peft"])


def logged_config(root: Path, **trainer: Any) -> Path:
    """The CLI tests' tiny config on a random 2-layer BERT, with a CSVLogger (versioned runs, metrics.csv) and
    a checkpoint that monitors val_acc, as the ready configs do."""
    config = tiny_config(root)
    config["model"]["init_args"].update(model_config=TINY_BERT, tokenizer_name_or_path="byte-level")
    config["trainer"].update(
        max_epochs=2,
        log_every_n_steps=1,
        logger={"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(root)}},
        callbacks=[
            {
                "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"monitor": "val_acc", "mode": "max", "save_last": True},
            }
        ],
        **trainer,
    )
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_fit_tests_the_best_checkpoint_and_ends_with_a_summary_and_curves(tmp_path, caplog):
    config = logged_config(tmp_path)
    with caplog.at_level("INFO"):
        cli = cli_main(["fit", "--config", str(config)])
    run = Path(cli.trainer.log_dir)
    best = cli.trainer.checkpoint_callback.best_model_path
    # the test metrics after fit are those `lightning-peft test` gives on the best checkpoint
    assert set(cli.test_metrics) == {"test_acc", "test_f1", "test_loss"}
    tested = cli_main(["test", "--config", str(config), "--ckpt_path", best])
    for name, value in cli.test_metrics.items():
        assert value == pytest.approx(tested.trainer.callback_metrics[name].item(), abs=1e-6), name
    # the fit's own metrics are kept (the test run replaced trainer.callback_metrics)
    assert {"val_acc", "val_loss", "train_loss"} <= set(cli.fit_metrics)
    assert not any(name.endswith("_step") for name in cli.fit_metrics)
    (summary,) = [
        line for line in _rank_zero_lines(caplog) if line.startswith("lightning-peft: fit finished")
    ]
    lines = summary.splitlines()
    assert lines[0] == f"lightning-peft: fit finished: 2 epochs, {cli.trainer.global_step} steps"
    counts = next(c for c in cli.trainer.callbacks if hasattr(c, "parameter_counts")).parameter_counts
    assert lines[1] == (
        f"  trained     LoRA: {int(counts['trainable']):,} of {int(counts['total']):,} parameters "
        f"({counts['trainable_percent']:.2f}%)"
    )
    score = cli.trainer.checkpoint_callback.best_model_score.item()
    assert lines[2] == f"  best        val_acc={score:.4f}  ({Path(best).name})"
    assert lines[4].startswith("  test        test_acc=") and lines[4].endswith(
        "(weights of the best checkpoint)"
    )
    assert lines[5] == f"  written to  {run}/"
    assert lines[6] == f"    checkpoints/  {', '.join(sorted([Path(best).name, 'last.ckpt']))}"
    assert [line.split()[0] for line in lines[7:]] == ["adapter/", "adapter_best/", "metrics.csv"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "adapter_best" / "adapter_model.safetensors").is_file()
    # curves.png beside metrics.csv, holding the curves the summary names
    png = run / "curves.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    names = list(read_curves(run / "metrics.csv"))
    assert {"val_acc", "val_loss", "train_loss_step"} <= set(names)
    assert lines[
        -1
    ] == f"    metrics.csv   and curves.png ({', '.join(n for n in names if 'loss' in n)}, " + (
        ", ".join(n for n in names if "loss" not in n) + ")"
    )


def test_test_after_fit_false_runs_no_test(tmp_path, caplog):
    with caplog.at_level("INFO"):
        cli = cli_main(["fit", "--config", str(logged_config(tmp_path)), "--test_after_fit", "false"])
    assert cli.test_metrics == {}
    assert "val_acc" in {k for k in cli.trainer.callback_metrics}  # nothing replaced the fit's metrics
    (summary,) = [
        line for line in _rank_zero_lines(caplog) if line.startswith("lightning-peft: fit finished")
    ]
    assert "\n  test " not in summary


def test_predict_writes_beside_the_checkpoints_run_and_keeps_earlier_predictions(tmp_path):
    config = logged_config(tmp_path)
    fitted = cli_main(["fit", "--config", str(config), "--test_after_fit", "false"])
    run = Path(fitted.trainer.log_dir)
    best = fitted.trainer.checkpoint_callback.best_model_path
    sentences = tmp_path / "sentences.txt"
    sentences.write_text("Lovely.\nAwful.\n")
    args = [
        "predict",
        "--config",
        str(config),
        "--ckpt_path",
        best,
        "--data.init_args.predict_file",
        str(sentences),
    ]
    first, second = cli_main(args), cli_main(args)
    # Both predict runs log nothing and write no config: no new version folder beside the fit's run ...
    assert first.trainer.logger is None and second.trainer.logger is None
    assert sorted(p.name for p in run.parent.iterdir()) == [run.name]
    rows = [
        [json.loads(line) for line in (run / name).read_text().splitlines()]
        for name in ("predictions.jsonl", "predictions-1.jsonl")
    ]  # ... the rows go beside the checkpoint, the second run's under a free name
    assert rows[0] == rows[1] and [r["text"] for r in rows[0]] == ["Lovely.", "Awful."]
    assert not list(tmp_path.glob("lightning_logs/version_[12]/predictions*"))


def test_read_curves_keeps_logged_finite_points_of_metrics_only(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(
        "epoch,peft/trainable_params,step,test_acc,train_loss,val_acc\n"
        "0,10,0,,0.9,\n"
        "0,,1,,nan,\n"
        "0,,1,,,0.5\n"
        "1,,3,,0.4,\n"
        "1,,3,,,0.75\n"
        "1,,3,0.7,,\n"
    )
    assert read_curves(path) == {"train_loss": [(0, 0.9), (3, 0.4)], "val_acc": [(1, 0.5), (3, 0.75)]}
    png, names = plot_curves(path, tmp_path / "out" / "c.png")
    assert png == tmp_path / "out" / "c.png" and png.read_bytes()[:8] == PNG_SIGNATURE
    assert names == ["train_loss", "val_acc"] and [p.name for p in png.parent.iterdir()] == ["c.png"]


def test_curves_refuse_what_they_cannot_draw(tmp_path, monkeypatch):
    other = tmp_path / "other.csv"
    other.write_text("a,b\n1,2\n")
    with pytest.raises(
        ValueError, match=r"no 'step' column; expected the metrics.csv of Lightning's CSVLogger"
    ):
        read_curves(other)
    empty = tmp_path / "metrics.csv"
    empty.write_text("epoch,step,test_acc\n0,3,0.5\n")
    with pytest.raises(ValueError, match="no metric was logged"):
        plot_curves(empty)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'lightning-peft\[plot\]'"):
        plot_curves(empty)
    assert not (tmp_path / "curves.png").exists()
