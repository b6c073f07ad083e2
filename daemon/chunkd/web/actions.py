"""The operator actions of the job page and of a kind's page (the jobs page filtered by the
kind): each a POST behind a confirmation page, CSRF and the operator token, calling one public
SQL function.

Adding one is one :class:`Action` in :data:`ACTIONS` (a job's) or :data:`KIND_ACTIONS` and its
named statement in ``sql/web.sql``: the routes, the confirmation page and the buttons are
generic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from uuid import UUID

from chunkd.db.locks import DEFAULT_LOCK_WAIT_S, Wanted
from chunkd.db.sql_files import queries
from chunkd.ops import TERMINAL_STATUSES
from chunkd.ops.errors import rows_of, run_locked

if TYPE_CHECKING:
    import asyncpg

    from chunkd.web.data import FlowControls

__all__ = ["ACTIONS", "KIND_ACTIONS", "Action", "available", "kind_actions", "run_action"]


@dataclass(frozen=True)
class Action:
    """``name`` is the URL segment (``/jobs/{id}/{name}``, ``/kinds/{name}?kind=K``);
    ``statement`` the named block of ``sql/web.sql`` it runs with the job id or the kind;
    ``applies`` says, from the job's progress document and its flow controls (a kind's: its
    ``kind_state`` row and None), whether the button is shown; ``question`` and ``done`` are
    the texts of the confirmation page (``{...}``: the progress document's keys, or the kind
    state's and ``{kind}``) and of the result (``{n}`` = the function's return value);
    ``wanted``: the locks the function takes, to name their holders when it cannot get them."""

    name: str
    label: str
    statement: str
    applies: Callable[[dict[str, Any], Any], bool]
    question: str
    done: str
    wanted: tuple[Wanted, ...]
    danger: bool = False


ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            name="retry",
            label="Retry failed chunks",
            statement="web_retry_failed_chunks",
            applies=lambda p, f: bool(p["failed_chunks"]) and p["overall_status"] != "cancelled",
            question="Put the {failed_chunks} failed chunk(s) of this job back to pending, "
            "with their attempts reset?",
            done="{n} failed chunk(s) back to pending",
            wanted=rows_of("jobs"),
        ),
        Action(
            name="pause",
            label="Pause job",
            statement="web_pause_sync_job",
            applies=lambda p, f: (
                p["overall_status"] not in TERMINAL_STATUSES and f.paused_at is None
            ),
            question="Pause this job? None of its {pending_chunks} pending chunk(s) is claimed "
            "until it is resumed; its {processing_chunks} chunk(s) processing now finish "
            "normally, and nothing is cancelled or spent.",
            done="job paused: {n} pending chunk(s) held back",
            wanted=(Wanted("chunkd.ready", "ShareLock"), *rows_of("jobs")),
        ),
        Action(
            name="resume",
            label="Resume job",
            statement="web_resume_sync_job",
            applies=lambda p, f: (
                p["overall_status"] not in TERMINAL_STATUSES and f.paused_at is not None
            ),
            question="Resume this job? Its {pending_chunks} pending chunk(s) may be claimed "
            "again at once.",
            done="job resumed: {n} pending chunk(s)",
            wanted=rows_of("jobs"),
        ),
        Action(
            name="cancel",
            label="Cancel job",
            statement="web_cancel_sync_job",
            applies=lambda p, f: p["overall_status"] not in TERMINAL_STATUSES,
            question="Cancel this job? Its {pending_chunks} pending and {processing_chunks} "
            "processing chunk(s) become cancelled; running handlers are fenced out.",
            done="{n} chunk(s) cancelled",
            wanted=rows_of("jobs", "ready", "scheduled", "attempts"),
            danger=True,
        ),
    )
}


# A kind's pause and resume (chunkd pause --kind, resume --kind): every job of the kind, present
# and future. A job paused on its own stays paused when its kind is resumed.
KIND_ACTIONS: dict[str, Action] = {
    a.name: a
    for a in (
        Action(
            name="pause",
            label="Pause kind",
            statement="web_pause_kind",
            applies=lambda k, _: k["paused_at"] is None,
            question="Pause kind {kind}, for its {active_jobs} unfinished job(s) and every job "
            "of the kind enqueued later? None of its {pending} pending chunk(s) is claimed "
            "until the kind is resumed; its {processing} chunk(s) processing now finish "
            "normally, and nothing is cancelled or spent.",
            done="kind paused: {n} pending chunk(s) held back",
            wanted=(Wanted("chunkd.ready", "ShareLock"), *rows_of("kind_flow")),
        ),
        Action(
            name="resume",
            label="Resume kind",
            statement="web_resume_kind",
            applies=lambda k, _: k["paused_at"] is not None,
            question="Resume kind {kind}? Its {pending} pending chunk(s) may be claimed again "
            "at once, but for those of jobs paused on their own.",
            done="kind resumed: {n} pending chunk(s)",
            wanted=rows_of("kind_flow"),
        ),
    )
}


def available(progress: dict[str, Any], flow: FlowControls) -> list[Action]:
    """The actions that apply to a job in this state, in display order."""
    return [a for a in ACTIONS.values() if a.applies(progress, flow)]


def kind_actions(state: dict[str, Any]) -> list[Action]:
    """The actions that apply to a kind in this state (its ``kind_state`` row)."""
    return [a for a in KIND_ACTIONS.values() if a.applies(state, None)]


async def run_action(
    pool: asyncpg.Pool,
    action: Action,
    subject: UUID | str,
    lock_wait_s: float = DEFAULT_LOCK_WAIT_S,
) -> int:
    """Runs the action on ``subject``, a job id (:data:`ACTIONS`) or a kind
    (:data:`KIND_ACTIONS`); returns the function's count (chunks retried, cancelled, held back
    by the pause, pending after the resume). Its lock waits last 50 ms (at most 200 ms),
    ``lock_wait_s`` in all (:func:`chunkd.ops.errors.run_locked`), so it never holds the fleet
    up. Raises
    ChunkdError with one line when the server refuses (no such job, a cancelled job, a role
    without the grant: the GRANT line names the dashboard's role) or when the locks stayed
    taken (naming the session that holds them)."""
    what = f"job {subject}" if isinstance(subject, UUID) else f"kind {subject!r}"
    async with pool.acquire() as conn:
        n: int = await run_locked(
            conn,
            queries("web.sql")[action.statement],
            subject,
            what=f"{action.name} of {what}",
            wanted=action.wanted,
            wait_s=lock_wait_s,
        )
    return n
