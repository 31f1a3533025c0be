"""The README's two fresh-machine commands stay true: CI runs the test command, the main job's config exists."""

import re
from pathlib import Path

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
