"""The documentation: README.md is the map and docs/ the depth.

Every command-line option of every script is on its script's docs page; every relative link of README.md
and docs/*.md leads to a file that exists (and, with #anchor, to a heading of that file); README.md stays
short; and its test command is the one CI runs.
"""
import argparse
import glob
import os
import re

import pytest

from conftest import REPO

README = os.path.join(REPO, "README.md")
DOCS = os.path.join(REPO, "docs")
README_MAX_BYTES = 16_000

# Where each script's options are documented. Any of the pages listed will do: train_model.py's
# mode-specific options (LoRA, DPO) live with post-training.
OPTION_PAGES = {
    "train_model": ["training.md", "post-training.md"],
    "generate": ["serving.md"],
    "serve": ["serving.md"],
    "export_gguf": ["serving.md"],
    "tokenizer": ["data.md"],
    "eval": ["evaluation.md"],
    "report": ["evaluation.md"],
    "bench": ["speed.md"],
}


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


class _Parser(Exception):
    def __init__(self, parser):
        super().__init__()
        self.parser = parser


def options_of(parse_args, monkeypatch):
    """The --options a script's argparse-based parse_args accepts, taken from its parser."""
    def capture(parser, *args, **kwargs):
        raise _Parser(parser)
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parser) as caught:
        parse_args([])
    parser = caught.value.parser
    return {option for action in parser._actions for option in action.option_strings
            if option.startswith("--") and option != "--help"}


@pytest.mark.parametrize("script", sorted(OPTION_PAGES))
def test_every_option_is_on_its_docs_page(script, monkeypatch):
    module = __import__(script)
    options = options_of(module.parse_args, monkeypatch)
    assert options, script
    pages = OPTION_PAGES[script]
    text = "\n".join(read(os.path.join(DOCS, page)) for page in pages)
    missing = sorted(option for option in options if f"`{option}`" not in text)
    assert not missing, f"{script}.py options missing from docs/{' or docs/'.join(pages)}: {missing}"


FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[(?:[^\]\[]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def without_code(markdown):
    """The text with fenced blocks and inline code spans blanked: links and headings there are not ones."""
    return INLINE_CODE.sub("", FENCE.sub("", markdown))


def slug(heading):
    """GitHub's anchor for a heading: its text (no markup) lower-cased, punctuation dropped, spaces to '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path):
    """Every anchor of a markdown file, repeated headings numbered as GitHub numbers them."""
    seen, result = {}, set()
    for line in FENCE.sub("", read(path)).splitlines():
        match = re.match(r"^ {0,3}#{1,6}\s+(.*?)\s*#*\s*$", line)
        if match:
            base = slug(match.group(1))
            count = seen.get(base, 0)
            seen[base] = count + 1
            result.add(base if count == 0 else f"{base}-{count}")
    return result


def markdown_files():
    return [README, *sorted(glob.glob(os.path.join(DOCS, "*.md")))]


def test_docs_pages_exist():
    for page in {p for pages in OPTION_PAGES.values() for p in pages} | {"correctness.md", "LOG.md"}:
        assert os.path.isfile(os.path.join(DOCS, page)), f"docs/{page} is missing"


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: os.path.relpath(p, REPO))
def test_relative_links_resolve(path):
    broken = []
    for target in LINK.findall(without_code(read(path))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto: ...
            continue
        file_part, _, anchor = target.partition("#")
        linked = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
        if not os.path.exists(linked):
            broken.append(f"{target}: no file {os.path.relpath(linked, REPO)}")
        elif anchor and linked.endswith(".md") and anchor not in anchors(linked):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(linked, REPO)}")
    assert not broken, f"{os.path.relpath(path, REPO)}: broken links: {broken}"


def test_slugs_are_githubs():
    assert slug("Multi-GPU and multi-node") == "multi-gpu-and-multi-node"
    assert slug("LoRA: `--lora_rank R`") == "lora---lora_rank-r"
    assert slug("2026-12-02: Muon + WSD, 0.52x") == "2026-12-02-muon--wsd-052x"
    assert slug("Export: llama.cpp, Ollama, vLLM") == "export-llamacpp-ollama-vllm"


def test_readme_is_a_map_not_a_manual():
    size = os.path.getsize(README)
    assert size <= README_MAX_BYTES, f"README.md is {size:,} bytes; at most {README_MAX_BYTES:,} (depth goes to docs/)"


def test_ci_runs_the_readme_test_command():
    readme = read(README)
    ci = read(os.path.join(REPO, ".ci", "run"))
    test_command = "pip install torch==2.13.0 -r requirements.txt && python -m pytest -q tests"
    assert test_command in readme
    assert "python -m pip install -q torch==2.13.0 -r requirements.txt" in ci and "python -m pytest -q tests" in ci
