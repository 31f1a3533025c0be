"""The README's two fresh-machine commands stay true: CI runs the test command, the main job's config exists."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    return [block.strip() for block in blocks[:2]]


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert "pytest" in test_command
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_main_command_is_a_lightning_peft_fit_on_a_shipped_config():
    main_command, _ = readme_commands()
    match = re.search(r"lightning-peft fit --config (\S+)", main_command)
    assert match is not None
    assert (ROOT / match.group(1)).is_file()


def test_the_oldest_leg_pins_exactly_the_declared_minimums():
    """constraints/oldest.txt is the declared floor: every `>=` minimum in pyproject, pinned, and nothing else."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [r for r in project["optional-dependencies"]["test"] if "peft" in r]
    minimums = {}
    for requirement in declared:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)(\[[^\]]*\])?>=([0-9.]+)", requirement)
        assert match is not None, f"{requirement!r} declares no minimum"
        minimums[match.group(1)] = match.group(3)
    pins = {}
    for line in (ROOT / "constraints" / "oldest.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.strip()] = version.strip()

    def release(version: str) -> tuple[int, ...]:  # ">=5.0" is the floor "==5.0.0"
        parts = tuple(int(p) for p in version.split("."))
        return parts + (0,) * (3 - len(parts))

    assert pins.keys() == minimums.keys()
    assert {n: release(v) for n, v in pins.items()} == {n: release(v) for n, v in minimums.items()}
    assert "<" not in " ".join(declared)  # no upper caps
    assert "-c constraints/oldest.txt" in (ROOT / ".ci" / "run").read_text()


RUNNABLE = re.compile(r"<!-- runnable(: long)? -->\n```bash\n(.*?)\n```", flags=re.S)


def runnable_blocks(long: bool = False) -> list[str]:
    """The README's bash blocks marked ``<!-- runnable -->`` (``long``: those marked ``runnable: long``)."""
    return [block for mark, block in RUNNABLE.findall((ROOT / "README.md").read_text()) if bool(mark) == long]


def test_every_readme_command_uses_the_setup_s_environment():
    """After the setup lines, commands run from .venv/bin, as the setup installed them (no bare entry points)."""
    for block in runnable_blocks() + runnable_blocks(long=True):
        for line in block.splitlines():
            assert not re.match(r"\s*(lightning-peft|python|pip)\b", line), line


@pytest.mark.slow
@pytest.mark.skipif(
    os.environ.get("LIGHTNING_PEFT_README_RUN") == "0",
    reason="the README walk-through runs in the newest leg only",
)
def test_the_readme_blocks_run_as_written_after_the_main_job(tmp_path):
    """The main job, then every block marked runnable, verbatim (only .venv/bin/ points at this interpreter's
    environment), in a fresh folder holding a copy of configs/."""
    main_command, _ = readme_commands()
    fit = main_command.split(" && ")[-1]
    assert fit.startswith(".venv/bin/lightning-peft fit ")
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    script = "\n".join([fit, *runnable_blocks()]).replace(".venv/bin/", f"{Path(sys.executable).parent}/")
    done = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=1500
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    (predictions,) = tmp_path.glob("runs/quickstart/lightning_logs/version_*/predictions.jsonl")
    rows = [json.loads(line) for line in predictions.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["A wonderful, moving film.", "The soup was cold and bland."]
    assert {r["label"] for r in rows} <= {"negative", "positive"}
    assert "test_acc" in done.stdout + done.stderr
    assert "prompt: What is LoRA?\nresponse: " in done.stdout
    assert (tmp_path / "exported" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "exported" / "merged" / "config.json").is_file()
    (best,) = tmp_path.glob("runs/quickstart/lightning_logs/version_0/adapter_best/adapter_model.safetensors")
    assert len(load_file(best)) == 26
