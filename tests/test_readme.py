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
