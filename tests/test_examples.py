"""The scripts in examples/ run as users run them (a fresh process) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import torch
from safetensors.torch import load_file

from lightning_peft import load_adapter

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
ADD_CALLBACK = EXAMPLES / "add_callback_to_existing_trainer.py"


def import_script(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_add_callback_to_existing_trainer_writes_a_trained_lora_adapter(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ADD_CALLBACK), "--output-dir", str(tmp_path), "--max-steps", "10"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (difference,) = re.findall(r"reloaded adapter: max \|logits difference\| = (\S+)", result.stdout)
    assert float(difference) < 1e-5

    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA"
    assert config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"]) == (8, 16)
    assert sorted(config["target_modules"]) == [
        f"model.layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")
    ]

    tensors = load_file(adapter / "adapter_model.safetensors")
    assert len(tensors) == 2 * 2 * 2  # layers x (q_proj, v_proj) x (lora_A, lora_B)
    assert all(k.startswith("base_model.model.model.layers.") for k in tensors)
    lora_B = [v for k, v in tensors.items() if k.endswith("lora_B.weight")]
    assert len(lora_B) == 4 and all(v.shape[1] == 8 for v in lora_B)
    assert all(torch.count_nonzero(v) > 0 for v in lora_B)  # trained: B starts at zero

    # the adapter-only Lightning checkpoint sits next to it
    (checkpoint,) = (tmp_path / "trainer" / "checkpoints").glob("*.ckpt")
    state = torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    assert len(state) == 8 and all(".lora_" in k for k in state)

    # another process: the same base model plus the files gives outputs that differ from the base alone
    example = import_script(ADD_CALLBACK)
    probe = example.counting_sequences(2, seed=1)
    with torch.no_grad():
        base_logits = example.tiny_llama().eval()(input_ids=probe).logits
        adapted = load_adapter(example.tiny_llama().eval(), adapter)
        adapted_logits = adapted(input_ids=probe).logits
    assert (adapted_logits - base_logits).abs().max() > 1e-3


def test_fabric_loop_resumes_exactly_from_an_adapter_only_checkpoint(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "fabric_loop.py"), "--output-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (uninterrupted,) = re.findall(r"uninterrupted losses: (\[.*\])", result.stdout)
    (resumed,) = re.findall(r"resumed losses: +(\[.*\])", result.stdout)
    assert json.loads(resumed) == json.loads(uninterrupted) and len(json.loads(resumed)) == 4
    (tensors,) = re.findall(r"checkpoint model tensors: (\[.*\])", result.stdout)
    names = json.loads(tensors.replace("'", '"'))
    assert len(names) == 8 and all(".lora_" in n for n in names)
    assert len(load_file(tmp_path / "adapter" / "adapter_model.safetensors")) == 8


def test_a_method_written_outside_the_package_passes_the_checks_every_method_passes(tmp_path):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "custom_method.py")],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    (difference,) = re.findall(
        r"passes lightning_peft.testing.check_method; .* max \|logit diff\| = (\S+)", result.stdout
    )
    assert float(difference) == 0.0
    # The trained LoHa factors are what trained (1,792 of 92,224 parameters: 4 factors on q_proj and v_proj of 2
    # layers, r=2, 64 wide).
    assert "LoHa 'default' trains 1,792 of 92,224 parameters" in result.stdout + result.stderr
