"""The README documents every command-line argument of every script, and its two set-up commands."""
import os
import re

import pytest

from conftest import REPO


def options_of(parse_args):
    """The --options an argparse-based parse_args accepts, found by asking it for --help."""
    import contextlib
    import io
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        parse_args(["--help"])
    options_section = out.getvalue().split("\noptions:\n", 1)[1]
    return set(re.findall(r"^\s+(--[a-z_]+)", options_section, flags=re.M)) - {"--help"}


@pytest.mark.parametrize("script", ["train_model", "generate", "tokenizer"])
def test_every_argument_is_in_the_readme(script):
    module = __import__(script)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    options = options_of(module.parse_args)
    assert options, script
    missing = sorted(o for o in options if f"`{o}`" not in readme)
    assert not missing, f"{script}.py arguments missing from README.md: {missing}"


def test_ci_runs_the_readme_test_command():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    test_command = "pip install torch==2.13.0 -r requirements.txt && python -m pytest -q tests"
    assert test_command in readme
    assert "python -m pip install -q torch==2.13.0 -r requirements.txt" in ci and "python -m pytest -q tests" in ci
