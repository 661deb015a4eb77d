"""``make install`` chooses where torch comes from (``TORCH_INDEX``) and the README says how to
run the commands and the server the demo trained. ``make -n -B`` prints the recipe the shell
would run, without running it."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.conftest import ROOT

CPU = "https://download.pytorch.org/whl/cpu"


def recipe(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.fail("make is not installed")
    r = subprocess.run(
        ["make", "-n", "-B", "-C", str(ROOT), "install", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return r.stdout


def torch_step(text: str) -> str:
    """The lines from the TORCH_INDEX choice to the torch install."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if "index=" in line)
    end = next(
        i
        for i in range(start, len(lines))
        if "torch==" in lines[i] and "install" in lines[i] and "--dry-run" not in lines[i]
    )
    return "\n".join(lines[start : end + 1])


def test_an_explicit_torch_index_is_used() -> None:
    step = torch_step(recipe(f"TORCH_INDEX={CPU}"))
    out = subprocess.run(
        ["bash", "-c", step.replace(".venv/bin/python -m pip install", "echo pip install")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == f"pip install --quiet --index-url {CPU} torch==2.13.0"


def test_an_empty_torch_index_leaves_pip_its_configuration() -> None:
    step = torch_step(recipe("TORCH_INDEX="))
    out = subprocess.run(
        ["bash", "-c", step.replace(".venv/bin/python -m pip install", "echo pip install")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip() == "pip install --quiet torch==2.13.0"


@pytest.mark.parametrize(("local_wheel", "expected"), [(True, ""), (False, f"--index-url {CPU} ")])
def test_by_default_a_local_wheel_wins_else_the_cpu_index(local_wheel: bool, expected: str) -> None:
    """The probe (``pip install --dry-run --no-index``) decides; stood in for by true/false."""
    step = torch_step(recipe())
    probe = "true" if local_wheel else "false"
    script = step.replace(
        ".venv/bin/python -m pip install --dry-run --no-deps --no-index --quiet torch==2.13.0",
        probe,
    ).replace(".venv/bin/python -m pip install", "echo pip install")
    assert probe in script and "--dry-run" not in script
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == f"pip install --quiet {expected}torch==2.13.0"


def test_readme_says_how_to_run_the_commands_and_the_demo_server() -> None:
    text = (ROOT / "README.md").read_text()
    assert ".venv/bin/ranker" in text and "source .venv/bin/activate" in text
    assert ".venv/bin/ranker serve --artifact artifacts/default" in text
    assert "TORCH_INDEX" in text
