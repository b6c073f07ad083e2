"""The README stays short and points at every page; the site's nav lists every page; links
resolve; the changelog knows the current version.

The site itself is built with ``mkdocs build --strict`` by tests/run.sh; the last test here
shows that a broken link really fails that build.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from chunkd import __version__
from doc_snippets import blocks

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_LIMIT_BYTES = 15_000
QUICK_START = [
    "python3 -m venv .venv && .venv/bin/pip install -q '.[embedded]' && .venv/bin/chunkd demo\n",
    "bash tests/run.sh\n",
]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def _nav_pages() -> list[str]:
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text.split("\nnav:\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"^  - [^:]+: (\S+\.md)$", nav, re.MULTILINE)


def _map_links(text: str, prefix: str) -> list[str]:
    """The page column of a "| page | what it covers |" table."""
    table = text.split("| page | what it covers |", 1)[1].split("\n\n", 1)[0]
    return re.findall(rf"^\| \[[^]]+\]\({re.escape(prefix)}([\w-]+\.md)\) \|", table, re.M)


def test_readme_is_at_most_15_kb() -> None:
    size = len(README.read_bytes())
    assert size <= README_LIMIT_BYTES, f"README.md is {size} bytes: move a section to docs/"


def test_readme_opens_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    assert re.findall(r"^## .*", text, re.MULTILINE)[0] == "## Quick start"
    assert [b.text for b in blocks(README)[:2]] == QUICK_START


def test_every_page_is_in_the_nav_and_in_both_maps() -> None:
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    nav = _nav_pages()
    assert sorted(nav) == pages, "mkdocs.yml's nav must list every page of docs/, once"
    assert nav[0] == "index.md"
    readme_map = _map_links(README.read_text(encoding="utf-8"), "docs/")
    site_map = _map_links((DOCS / "index.md").read_text(encoding="utf-8"), "")
    assert readme_map == site_map == nav[1:], "README's and index.md's maps follow the nav"


def test_readme_and_changelog_links_resolve() -> None:
    for page in (README, ROOT / "CHANGELOG.md"):
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            assert path.exists(), f"{page.name} links to {target}, which does not exist"


def test_changelog_has_the_current_version() -> None:
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert text.startswith("# Changelog\n")
    versions = re.findall(r"^## \[(\d+\.\d+\.\d+)\]", text, re.MULTILINE)
    assert versions and versions[0] == __version__, versions
    assert "## [0.1.0] - " in text


def test_a_broken_link_fails_the_strict_build(tmp_path: Path) -> None:
    mkdocs = Path(sys.executable).with_name("mkdocs")
    assert mkdocs.exists(), "no mkdocs next to this interpreter: pip install -e '.[docs]'"
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(DOCS, tmp_path / "docs")
    page = tmp_path / "docs" / "handlers.md"
    page.write_text(page.read_text(encoding="utf-8") + "\nSee [the queue](no-such-page.md).\n")
    # Exactly the options tests/run.sh builds with (--quiet, once there, hid the warnings
    # --strict counts, and a broken link passed).
    [line] = [
        line for line in (ROOT / "tests" / "run.sh").read_text().splitlines()
        if "mkdocs build" in line and not line.lstrip().startswith("#")
    ]  # fmt: skip
    options = line.split("mkdocs build", 1)[1].split()
    assert options[-2:] == ["--site-dir", "site"], line
    built = subprocess.run(
        [str(mkdocs), "build", *options[:-2], "--site-dir", str(tmp_path / "site")],
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert built.returncode == 1, built.stdout + built.stderr
    assert "no-such-page.md" in built.stderr
