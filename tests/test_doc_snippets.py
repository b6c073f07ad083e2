"""The SQL and shell snippets of README.md and docs/*.md run, page by page, top to bottom.

(The Supabase guide has its own test, tests/test_supabase_doc.py.) Every ``sql``, ``sh`` and
``console`` block runs against a fresh migrated database unless the line before it is
``<!-- not-run: why -->``:

- ``sql``: statement by statement on one connection, inside a transaction rolled back when the
  page is done (the security page creates roles, which are cluster-wide);
  ``'your-sync-job-id'`` stands for the job the page created last;
- ``sh``: ``bash`` with ``set -euo pipefail`` and the page's earlier ``export`` lines, as in
  one terminal session; it must exit 0;
- ``console``: a transcript; its ``$`` commands run in one ``bash`` and each must print
  exactly the lines shown below it. A UUID in the shown output stands for whatever id the
  command printed, and the same UUID later on the page means that id. A command whose output
  is a ``chunkd: error:`` line must exit 2, any other 0. ``$ cat FILE`` of a file that does not
  exist yet first creates it with the content shown, as the reader of the page has it.

Commands run in a temporary directory, find ``chunkd`` next to this interpreter, and have
``CHUNKD_DSN`` set to the test database (the pages assume it is set, as Getting started
shows); the example DSNs written on the pages are replaced by the test database's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import pytest

from chunkd.db import connect
from doc_snippets import RUNNABLE, Block, blocks, sql_statements, stray_markers

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
OWN_TEST = {"supabase.md": "tests/test_supabase_doc.py"}
EXAMPLE_DSNS = (
    "postgresql://chunkd@db.example/app",
    "postgresql://admin@db.example.internal/app",
)
JOB_PLACEHOLDER = "your-sync-job-id"
UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
MARK = "@@chunkd-doc-snippet@@"


def _pages_to_run() -> list[Path]:
    return [
        page
        for page in PAGES
        if page.name not in OWN_TEST
        and any(b.lang in RUNNABLE and b.not_run is None for b in blocks(page))
    ]


# --- what every page must look like -----------------------------------------------------------


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_blocks_are_labelled_and_every_skip_says_why(page: Path) -> None:
    assert not stray_markers(page), f"{page.name}: not-run markers before no block"
    for block in blocks(page):
        assert block.lang, f"{block.where}: a fence without a language (sh? text?)"
        if block.not_run is not None:
            assert block.lang in RUNNABLE, f"{block.where}: a {block.lang} block never runs"
            assert len(block.not_run) >= 10, f"{block.where}: say why it cannot run"
        if block.lang == "python":
            compile(block.text, block.where, "exec")  # the examples at least parse


def test_the_pages_that_run_are_the_expected_ones() -> None:
    # A page whose every block were marked not-run would silently drop out of the test below.
    names = [p.name for p in _pages_to_run()]
    assert names == [
        "README.md",
        "cli.md",
        "continuations.md",
        "flow-control.md",
        "getting-started.md",
        "handlers.md",
        "observability.md",
        "schedules.md",
        "security.md",
        "sql-api.md",
        "systemd.md",
    ]


# --- running them -----------------------------------------------------------------------------


@dataclass
class Session:
    """What carries over from one block to the next on a page, like one terminal and psql."""

    dsn: str
    cwd: Path
    conn: asyncpg.Connection
    exports: list[str] = field(default_factory=list)
    ids: dict[str, str] = field(default_factory=dict)  # UUID on the page -> the real one
    job_id: str | None = None

    def env(self) -> dict[str, str]:
        bin_dir = str(Path(sys.executable).parent)
        if not shutil.which("chunkd", path=bin_dir):
            pytest.fail(f"no chunkd entry point next to {sys.executable}: pip install -e .")
        env = {k: v for k, v in os.environ.items() if not k.startswith("CHUNKD_")}
        env.pop("DATABASE_URL", None)
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", CHUNKD_DSN=self.dsn)
        return env

    def substitute(self, text: str) -> str:
        for example in EXAMPLE_DSNS:
            text = text.replace(example, self.dsn)
        for on_page, real in self.ids.items():
            text = text.replace(on_page, real)
        return text

    def bash(self, script: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-c", script],
            cwd=self.cwd,
            env=self.env(),
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )


async def _run_sql(session: Session, block: Block) -> None:
    for statement in sql_statements(block.text):
        if JOB_PLACEHOLDER in statement:
            assert session.job_id, f"{block.where}: {JOB_PLACEHOLDER} before any job was created"
            statement = statement.replace(JOB_PLACEHOLDER, session.job_id)
        try:
            rows = await session.conn.fetch(statement)
        except asyncpg.PostgresError as exc:
            pytest.fail(f"{block.where}: {exc}\n{statement}")
        if statement.startswith("SELECT chunkd.create_sync_job("):
            session.job_id = str(rows[0][0])


def _run_sh(session: Session, block: Block) -> None:
    script = "set -euo pipefail\n" + "".join(session.exports) + session.substitute(block.text)
    done = session.bash(script)
    assert done.returncode == 0, (
        f"{block.where} exited {done.returncode}:\n{done.stdout}{done.stderr}"
    )
    session.exports += [ln + "\n" for ln in block.text.splitlines() if ln.startswith("export ")]


@dataclass
class Command:
    line: str
    shown: list[str] = field(default_factory=list)


def _commands(block: Block) -> list[Command]:
    commands: list[Command] = []
    for line in block.text.splitlines():
        if line.startswith("$ "):
            commands.append(Command(line[2:]))
        else:
            assert commands, f"{block.where}: a transcript starts with a $ command"
            commands[-1].shown.append(line)
    return commands


def _bind(session: Session, shown: str, printed: str) -> bool:
    """Does ``printed`` match ``shown``, with the UUIDs of the page bound to the real ones?"""
    parts = UUID.split(shown)
    pattern = "(" + UUID.pattern + ")"
    match = re.fullmatch(pattern.join(map(re.escape, parts)), printed)
    if match is None:
        return False
    for on_page, real in zip(UUID.findall(shown), match.groups(), strict=True):
        if session.ids.setdefault(on_page, real) != real:
            return False
    return True


def _run_console(session: Session, block: Block) -> None:
    commands = _commands(block)
    script = "".join(session.exports)
    for index, command in enumerate(commands):
        target = re.fullmatch(r"cat (\S+)", command.line)
        if target and not (session.cwd / target[1]).exists():
            (session.cwd / target[1]).write_text("".join(ln + "\n" for ln in command.shown))
        script += (
            f"printf '%s start {index}\\n' {MARK}\n"
            f"{{ {session.substitute(command.line)}\n}} 2>&1\n"
            f"printf '\\n%s end {index} %d\\n' {MARK} $?\n"
        )
    done = session.bash(script)
    output = done.stdout
    for index, command in enumerate(commands):
        found = re.search(
            rf"^{MARK} start {index}\n(.*?)\n{MARK} end {index} (\d+)$", output, re.S | re.M
        )
        assert found, f"{block.where}: `{command.line}` did not finish:\n{output}{done.stderr}"
        printed = found[1][:-1] if found[1].endswith("\n") else found[1]
        lines = printed.splitlines()
        context = f"{block.where}: `{command.line}` printed:\n{printed}\nthe page shows:\n"
        context += "\n".join(command.shown)
        assert len(lines) == len(command.shown), context
        for shown, line in zip(command.shown, lines, strict=True):
            if not _bind(session, shown, line):
                pytest.fail(context, pytrace=False)
        error = any(ln.startswith("chunkd: error:") for ln in command.shown)
        assert int(found[2]) == (2 if error else 0), f"exit {found[2]}: {context}"


@pytest.mark.parametrize("page", _pages_to_run(), ids=lambda p: p.name)
async def test_the_page_top_to_bottom(page: Path, database, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    conn = await connect(database.dsn)
    transaction = conn.transaction()
    await transaction.start()
    session = Session(dsn=database.dsn, cwd=tmp_path, conn=conn)
    ran = 0
    try:
        for block in blocks(page):
            if block.lang not in RUNNABLE or block.not_run is not None:
                continue
            if block.lang == "sql":
                await _run_sql(session, block)
            elif block.lang == "sh":
                _run_sh(session, block)
            else:
                _run_console(session, block)
            ran += 1
    finally:
        await transaction.rollback()
        await conn.close()
    assert ran > 0
