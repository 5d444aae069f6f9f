"""The README's set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_readme_starts_with_the_two_setup_commands():
    main_cmd, test_cmd = _readme_commands()[:2]
    assert main_cmd.startswith("pip install torch==2.13.0") and main_cmd.endswith("bnnpyro")
    assert test_cmd.startswith("pip install torch==2.13.0") and "pytest" in test_cmd


def test_ci_runs_the_readme_test_command_verbatim_after_pinning_torch():
    test_cmd = _readme_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    pin = ci.index("pip install torch==2.13.0")
    assert test_cmd in ci[pin + 1 :]
