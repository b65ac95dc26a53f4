"""The README and the docs/ pages: every relative link and image resolves (a #section too), and every `ldm`
subcommand they name exists in the command's parser."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cli.main import build_parser

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
COMMAND = re.compile(r"(?<![\w/.-])ldm ([a-z][a-z0-9-]*)(?: ([a-z][a-z0-9-]*))?")


def pages(root: Path) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def prose(path: Path) -> list[str]:
    """The page's lines outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """GitHub's anchors for the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in prose(path) if line.startswith("#")}


def broken_links(root: Path) -> list[str]:
    bad = []
    for page in pages(root):
        for line in prose(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
                    continue
                file, _, anchor = target.partition("#")
                path = (page.parent / file).resolve() if file else page
                if not path.exists():
                    bad.append(f"{page.relative_to(root)}: {target} (no such file)")
                elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                    bad.append(f"{page.relative_to(root)}: {target} (no such section)")
    return bad


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


def unknown_commands(root: Path) -> list[str]:
    commands = subcommands(build_parser())
    bad = []
    for page in pages(root):
        for first, second in COMMAND.findall(page.read_text()):
            if first not in commands:
                bad.append(f"{page.relative_to(root)}: ldm {first}")
                continue
            nested = subcommands(commands[first])
            if nested and second and second not in nested:  # "ldm eval ..." names the family
                bad.append(f"{page.relative_to(root)}: ldm {first} {second}")
    return sorted(set(bad))


def test_every_relative_link_and_image_resolves():
    assert len(pages(ROOT)) > 5
    assert broken_links(ROOT) == []


def test_every_ldm_command_in_the_docs_exists():
    assert unknown_commands(ROOT) == []


def test_the_checks_catch_a_broken_link_section_image_and_command(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some `code` (here)\n\n![pic](missing.png)\n"
                                            "[ok](#some-code-here) [bad](#nowhere) [up](../README.md#top)\n")
    (tmp_path / "README.md").write_text("# Top\n\n[a](docs/a.md#a-page) [b](docs/b.md)\n\n"
                                        "Run `ldm generate x`, `ldm eval generate`, `ldm eval nothing` and `ldm fly`;"
                                        " ldm/diffusion.py is a path.\n")
    assert broken_links(tmp_path) == ["README.md: docs/b.md (no such file)", "docs/a.md: missing.png (no such file)",
                                      "docs/a.md: #nowhere (no such section)"]
    assert unknown_commands(tmp_path) == ["README.md: ldm eval nothing", "README.md: ldm fly"]


def test_ci_installs_exactly_as_the_readme_says():
    """The README's install lines are .ci/run's, in the same order, so a fresh clone that follows the README gets
    everything the default suite needs (the browser's Chromium aside: those tests skip without it)."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    block = readme.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    readme_installs = [line.strip() for line in block.splitlines() if line.strip().startswith("pip install")]
    ci = [line.strip() for line in (root / ".ci" / "run").read_text().splitlines()]
    assert readme_installs and [line for line in ci if line.startswith("pip install")] == readme_installs
    assert "python -m pytest" in readme and "python -m pytest" in ci
