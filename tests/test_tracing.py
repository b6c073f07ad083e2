"""OpenTelemetry tracing (issue 24): a job enqueued inside a span is one trace, each chunk's
first attempt a child of the enqueuing span, a retry a new trace linked to it, the job's end an
event there; http: and exec: handlers get the chunk span's context. In-process with the SDK's
in-memory exporter; the OTLP test runs ``chunkd run`` against an OTLP/HTTP endpoint of its own
that decodes the protobuf."""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import subprocess
import sys
import time
import uuid
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import chunkd.client
from chunkd.handlers import HandlerRegistry
from chunkd.handlers.exec import ExecHandler
from chunkd.handlers.http import HttpHandler
from chunkd.observability.tracing import Tracing
from chunkd.runtime.supervisor import run_daemon
from chunkd.settings import RunSettings
from daemon_helpers import TESTS_DIR, run_chunkd, wait_until
from trace_handlers import flaky, rendezvous

FAST = {"retry_base_s": 0.05, "retry_cap_s": 0.1, "poll_interval_s": 1.0}


def _memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    provider = TracerProvider()
    exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider, exporter


def _named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def _traceparent(span: ReadableSpan) -> str:
    c = span.get_span_context()
    return f"00-{c.trace_id:032x}-{c.span_id:016x}-{int(c.trace_flags):02x}"


async def _run_until(
    dsn: str,
    registry: HandlerRegistry,
    tracing: Tracing | list[Tracing],
    done: Any,
    what: str,
    concurrency: int = 4,
) -> None:
    """In-process daemons (as ``chunkd run`` runs them), one per Tracing, until ``done()``."""
    settings = RunSettings(
        dsn=dsn, concurrency=concurrency, progress_interval_s=0, schedule_interval_s=0, **FAST
    )
    stop = asyncio.Event()
    tracings = tracing if isinstance(tracing, list) else [tracing]
    tasks = [asyncio.create_task(run_daemon(settings, registry, stop, tracing=t)) for t in tracings]

    async def check() -> Any:
        value = done()
        return await value if inspect.isawaitable(value) else value

    try:
        await wait_until(check, timeout_s=30, what=what)
    finally:
        stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        for t in tracings:
            t.shutdown()


async def test_a_job_enqueued_in_a_span_is_one_trace_and_its_retry_is_linked(database, db):
    provider, exporter = _memory()
    tracing = Tracing(provider)
    with provider.get_tracer("app").start_as_current_span("enqueue"):
        job = await chunkd.client.create_sync_job(
            db, "traced", [{}, {"fail_until": 1}, {}], max_attempts=3
        )
    await _run_until(
        database.dsn,
        HandlerRegistry({"traced": flaky}),
        tracing,
        lambda: _named(exporter, "chunkd.job_finished"),
        "the job_finished span",
    )
    (root,) = _named(exporter, "enqueue")
    trace_id, root_id = root.context.trace_id, root.context.span_id
    assert root.parent is None
    chunks = sorted(
        _named(exporter, "chunkd.chunk"), key=lambda s: s.attributes["chunkd.chunk.attempt"]
    )
    assert len(chunks) == 4, [dict(s.attributes) for s in chunks]
    firsts, (retry,) = chunks[:3], chunks[3:]

    # The three first attempts: children of the enqueuing span, in its trace.
    for span in firsts:
        assert span.context.trace_id == trace_id
        assert span.parent is not None and span.parent.span_id == root_id
        assert span.kind is SpanKind.CONSUMER
        assert not span.links
    assert sorted(s.attributes["chunkd.chunk.seq"] for s in firsts) == [0, 1, 2]
    for span in chunks:
        assert span.attributes["chunkd.kind"] == "traced"
        assert span.attributes["chunkd.job_id"] == str(job)
        assert span.attributes["chunkd.worker_id"] == tracing.worker_id != ""
    failed = next(s for s in firsts if s.attributes["chunkd.chunk.seq"] == 1)
    assert failed.attributes["chunkd.outcome"] == "error"
    assert failed.status.status_code is StatusCode.ERROR
    (exception,) = [e for e in failed.events if e.name == "exception"]
    assert exception.attributes["exception.message"] == "seq 1 fails on attempt 1"
    assert {s.attributes["chunkd.outcome"] for s in firsts if s is not failed} == {"completed"}

    # The retry: a trace of its own, linked to the enqueuing span, not a child of it.
    assert retry.attributes["chunkd.chunk.seq"] == 1
    assert retry.attributes["chunkd.chunk.attempt"] == 2
    assert retry.attributes["chunkd.chunk.claim"] == 2
    assert retry.attributes["chunkd.outcome"] == "completed"
    assert retry.parent is None and retry.context.trace_id != trace_id
    (link,) = retry.links
    assert (link.context.trace_id, link.context.span_id) == (trace_id, root_id)

    # The job's end, once, in the job's trace.
    (finished,) = _named(exporter, "chunkd.job_finished")
    assert finished.context.trace_id == trace_id and finished.parent.span_id == root_id
    (event,) = finished.events
    assert event.name == "job_finished"
    assert event.attributes["chunkd.job.status"] == "completed"
    assert event.attributes["chunkd.job.completed_chunks"] == 3
    assert event.attributes["chunkd.job_id"] == str(job)


async def test_a_job_the_enqueuer_did_not_sample_records_no_span_not_even_its_retry(database, db):
    """traceparent flags 00: the enqueuer's tracer decided not to sample. Neither the first
    attempts (children) nor the retry (a new trace, linked) nor job_finished is recorded;
    the retry's handler still runs in a context that says "not sampled", so what it calls
    (http:, exec:, its own spans) does not sample either."""
    provider, exporter = _memory()
    trace_id = uuid.uuid4().hex
    unsampled = f"00-{trace_id}-{uuid.uuid4().hex[:16]}-00"
    job = await chunkd.client.create_sync_job(
        db, "traced", [{}, {"fail_until": 1}, {}], max_attempts=3, traceparent=unsampled
    )

    async def completed() -> bool:
        status = await db.fetchval(
            "SELECT overall_status FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        )
        return bool(status == "completed")

    await _run_until(
        database.dsn, HandlerRegistry({"traced": flaky}), Tracing(provider), completed, "the job"
    )  # _run_until shuts the provider's processors down: every span ended is exported
    assert exporter.get_finished_spans() == ()
    rows = await db.fetch(
        "SELECT seq, attempts, result FROM chunkd.chunk_processing_queue"
        " WHERE parent_sync_job_id = $1 ORDER BY seq",
        job,
    )
    assert [r["attempts"] for r in rows] == [1, 2, 1]
    for r in rows:
        seen = r["result"]["traceparent"]
        assert seen is not None and seen.endswith("-00"), r  # not sampled, passed on as such
        # The first attempts in the job's trace; the retry in a trace of its own.
        assert (seen.split("-")[1] == trace_id) == (r["attempts"] == 1), r


async def test_job_finished_comes_once_from_the_daemon_whose_outcome_finished_the_job(database, db):
    # Two daemons of one slot each share the job: its first two chunks meet (so each daemon
    # holds one), and the first finishes after all others, so the chunk that finishes the job
    # is not the one its daemon started last.
    provider, exporter = _memory()
    chunks = [{"meet": 2, "after": 11}, {"meet": 2}] + [{}] * 10
    with provider.get_tracer("app").start_as_current_span("enqueue") as enqueuing:
        job = await chunkd.client.create_sync_job(db, "napping", chunks)
    daemons = [Tracing(provider), Tracing(provider)]
    seen_at: list[float] = []

    async def finished() -> bool:
        status = await db.fetchval(
            "SELECT overall_status FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        )
        if status != "completed" or not _named(exporter, "chunkd.job_finished"):
            return False
        # A second span could only be waited for: the other daemon hears the same NOTIFY
        # within milliseconds, and its probe finds no row. Both daemons run on meanwhile.
        seen_at.append(time.monotonic())
        return seen_at[-1] - seen_at[0] >= 0.5

    await _run_until(
        database.dsn,
        HandlerRegistry({"napping": rendezvous}),
        daemons,
        finished,
        "the job and its job_finished span",
        concurrency=1,
    )
    ran = {s.attributes["chunkd.worker_id"] for s in _named(exporter, "chunkd.chunk")}
    assert ran == {d.worker_id for d in daemons}, "both daemons ran chunks of the job"
    (finished_span,) = _named(exporter, "chunkd.job_finished")
    assert finished_span.context.trace_id == enqueuing.get_span_context().trace_id
    # The transaction that finished the job stamped its claim's end with the job's finish.
    finisher = await db.fetchval(
        "SELECT e.worker_id FROM chunkd.chunk_events e"
        " JOIN chunkd.chunk_processing_status s ON s.parent_sync_job_id = e.sync_job_id"
        " WHERE e.sync_job_id = $1 AND e.event = 'completed' AND e.at = s.finished_at",
        job,
    )
    assert finished_span.attributes["chunkd.worker_id"] == finisher


async def test_a_job_enqueued_outside_a_span_gets_root_spans_and_no_job_event(database, db):
    provider, exporter = _memory()
    job = await chunkd.client.create_sync_job(db, "traced", [{}, {}])
    assert (
        await db.fetchval("SELECT traceparent FROM chunkd.jobs WHERE public_id = $1", job) is None
    )
    await _run_until(
        database.dsn,
        HandlerRegistry({"traced": flaky}),
        Tracing(provider),
        lambda: len(_named(exporter, "chunkd.chunk")) == 2,
        "two chunk spans",
    )
    spans = _named(exporter, "chunkd.chunk")
    assert all(s.parent is None and not s.links for s in spans)
    assert len({s.context.trace_id for s in spans}) == 2
    assert not _named(exporter, "chunkd.job_finished")


async def test_http_and_exec_handlers_get_the_chunk_spans_context(database, db, monkeypatch):
    # What the daemon inherited names its parent's span: never passed on beside the chunk's.
    monkeypatch.setenv("TRACEPARENT", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    monkeypatch.setenv("TRACESTATE", "vendor=inherited")
    seen: list[str | None] = []

    async def endpoint(request: web.Request) -> web.Response:
        seen.append(request.headers.get("traceparent"))
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/", endpoint)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    http = HttpHandler(f"http://127.0.0.1:{port}/")
    keys = ["TRACEPARENT", "TRACESTATE"]
    show = f"import json, os; print(json.dumps([os.environ.get(k) for k in {keys!r}]))"
    command = f'{sys.executable} -c "{show}"'
    registry = HandlerRegistry({"web": http, "cmd": ExecHandler(command)}, closables=[http])
    provider, exporter = _memory()
    try:
        with provider.get_tracer("app").start_as_current_span("enqueue"):
            await chunkd.client.create_sync_job(db, "web", [{}])
            cmd_job = await chunkd.client.create_sync_job(db, "cmd", [{}])
        await _run_until(
            database.dsn,
            registry,
            Tracing(provider),
            lambda: len(_named(exporter, "chunkd.chunk")) == 2,
            "both chunk spans",
        )
    finally:
        await runner.cleanup()
    spans = {s.attributes["chunkd.kind"]: s for s in _named(exporter, "chunkd.chunk")}
    assert seen == [_traceparent(spans["web"])]
    result = await db.fetchval(
        "SELECT result FROM chunkd.chunk_processing_queue WHERE parent_sync_job_id = $1", cmd_job
    )
    assert result == [_traceparent(spans["cmd"]), None]  # db decodes jsonb


async def test_a_traceparent_chunkd_cannot_use_is_refused_in_one_line(db):
    from chunkd.errors import InvalidInputError

    for bad in ("", "00-abc", "00-" + "0" * 32 + "-" + "1" * 16 + "-01", "x" * 500):
        with pytest.raises(InvalidInputError) as refused:
            await chunkd.client.create_sync_job(db, "k", [{}], traceparent=bad)
        assert str(refused.value).startswith("traceparent must be a W3C traceparent"), bad
        assert "\n" not in str(refused.value)
    good = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    job = await db.fetchval("SELECT chunkd.create_sync_job('k', '[{}]', traceparent => $1)", good)
    assert (
        await db.fetchval("SELECT traceparent FROM chunkd.jobs WHERE public_id = $1", job) == good
    )
    (bulk,) = await chunkd.client.create_sync_jobs(
        db, [{"kind": "k", "chunks": [{}], "traceparent": good}]
    )
    assert (
        await db.fetchval("SELECT traceparent FROM chunkd.jobs WHERE public_id = $1", bulk) == good
    )


class _Receiver:
    """An OTLP/HTTP endpoint (``POST /v1/traces``, protobuf) that keeps the spans it is sent,
    with their resource's attributes."""

    def __init__(self) -> None:
        self.spans: list[tuple[dict[str, Any], Any]] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/traces", self._export)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _export(self, request: web.Request) -> web.Response:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        assert request.content_type == "application/x-protobuf"
        message = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in message.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                self.spans += [(resource, span) for span in scope_spans.spans]
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    def named(self, name: str) -> list[Any]:
        return [span for _, span in self.spans if span.name == name]


def _attributes(pairs: Any) -> dict[str, Any]:
    return {kv.key: getattr(kv.value, kv.value.WhichOneof("value")) for kv in pairs}


async def test_chunkd_run_exports_the_trace_over_otlp_http(db, start):
    receiver = _Receiver()
    await receiver.start()
    provider, _ = _memory()
    try:
        with provider.get_tracer("app").start_as_current_span("enqueue") as enqueuing:
            job = await chunkd.client.create_sync_job(
                db, "traced", [{}, {"fail_until": 1}, {}], max_attempts=3
            )
        daemon = start(
            "--handler", "traced=trace_handlers:flaky", "--retry-base", "50ms",
            "--retry-cap", "100ms",
            env={
                "OTEL_TRACES_EXPORTER": "otlp",
                "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}",
                "OTEL_SERVICE_NAME": "chunkd-otlp-test",
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1",
            },
        )  # fmt: skip

        async def finished() -> bool:
            return bool(receiver.named("chunkd.job_finished"))

        await wait_until(finished, timeout_s=30, what="job_finished over OTLP")
        assert await daemon.stop() == 0
    finally:
        await receiver.stop()
    root = enqueuing.get_span_context()
    trace_id, root_id = root.trace_id.to_bytes(16, "big"), root.span_id.to_bytes(8, "big")
    assert {resource["service.name"] for resource, _ in receiver.spans} == {"chunkd-otlp-test"}
    chunks = receiver.named("chunkd.chunk")
    assert len(chunks) == 4
    firsts = [s for s in chunks if _attributes(s.attributes)["chunkd.chunk.attempt"] == 1]
    (retry,) = [s for s in chunks if _attributes(s.attributes)["chunkd.chunk.attempt"] == 2]
    assert sorted(_attributes(s.attributes)["chunkd.chunk.seq"] for s in firsts) == [0, 1, 2]
    for span in firsts:
        assert (span.trace_id, span.parent_span_id) == (trace_id, root_id)
        assert span.kind == span.SPAN_KIND_CONSUMER
        attributes = _attributes(span.attributes)
        assert attributes["chunkd.kind"] == "traced"
        assert attributes["chunkd.job_id"] == str(job)
        assert attributes["chunkd.worker_id"]
    assert retry.trace_id != trace_id and retry.parent_span_id == b""
    assert [(link.trace_id, link.span_id) for link in retry.links] == [(trace_id, root_id)]
    assert _attributes(retry.attributes)["chunkd.outcome"] == "completed"
    (done,) = receiver.named("chunkd.job_finished")
    assert (done.trace_id, done.parent_span_id) == (trace_id, root_id)
    assert [e.name for e in done.events] == ["job_finished"]


_NO_OTEL = '''
import sys

class _NoOpenTelemetry:
    """As if the [otel] extra were not installed: opentelemetry cannot be imported."""

    def find_spec(self, name, path=None, target=None):
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoOpenTelemetry())
'''


async def test_chunkd_runs_and_enqueues_without_opentelemetry(database, db, start, tmp_path):
    blocker = tmp_path / "no_otel"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(_NO_OTEL)
    env = {
        "PYTHONPATH": os.pathsep.join([str(blocker), str(TESTS_DIR)]),
        "OTEL_TRACES_EXPORTER": "console",
    }
    probe = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-c", "import chunkd.client, chunkd.cli\n"
         "from chunkd.observability.tracing import current_traceparent\n"
         "assert current_traceparent() is None\n"
         "import opentelemetry"],
        env={**os.environ, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert "No module named 'opentelemetry'" in probe.stderr, probe.stderr
    assert 'File "<string>", line 4,' in probe.stderr, probe.stderr  # the last line's import
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    enqueued = await asyncio.to_thread(
        run_chunkd, "enqueue", "--dsn", database.dsn, "--kind", "traced", "-",
        stdin=b'[{}, {"fail_until": 1}]', env={**env, "TRACEPARENT": traceparent},
    )  # fmt: skip
    assert enqueued.code == 0, enqueued.stderr
    job = uuid.UUID(enqueued.stdout.strip())
    assert await db.fetchval("SELECT traceparent FROM chunkd.jobs WHERE public_id = $1", job) == (
        traceparent
    )
    daemon = start("--handler", "traced=trace_handlers:flaky", "--retry-base", "50ms", env=env)

    async def completed() -> bool:
        status = await db.fetchval(
            "SELECT overall_status FROM chunkd.chunk_processing_status"
            " WHERE parent_sync_job_id = $1",
            job,
        )
        return bool(status == "completed")

    await wait_until(completed, timeout_s=30, what="the job, run without opentelemetry")
    assert await daemon.stop() == 0
    (warning,) = [e for e in daemon.events() if e.get("event") == "tracing.unavailable"]
    assert "pip install 'chunkd[otel]'" in warning["reason"]
    assert not daemon.crash_lines()  # the flaky handler's traceback rides on its retry line


@pytest.mark.parametrize(
    ("env", "asker"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9/v1/traces"},
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
        ),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, "OTEL_TRACES_EXPORTER"),
    ],
)
def test_without_the_extra_the_warning_names_the_variable_that_asked(
    tmp_path, env: dict[str, str], asker: str
) -> None:
    """Only an endpoint set: the endpoint asks for otlp, not OTEL_TRACES_EXPORTER."""
    (tmp_path / "sitecustomize.py").write_text(_NO_OTEL)
    script = (
        "import os\n"
        "from chunkd.observability.logs import configure_logging\n"
        "from chunkd.observability.tracing import configure\n"
        "configure_logging('json', 'info')\n"
        "assert configure() is None\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}, **env,
             "PYTHONPATH": str(tmp_path)},
        capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    (line,) = [json.loads(x) for x in run.stdout.splitlines() if "tracing.unavailable" in x]
    wanted = "otlp" if asker != "OTEL_TRACES_EXPORTER" else "console,otlp"
    assert line["reason"].startswith(f"{asker} asks for {wanted}, but opentelemetry is not"), line


def test_a_protocol_refused_names_the_variable_that_set_it() -> None:
    from chunkd.errors import ChunkdError
    from chunkd.observability.tracing import configure

    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"}
    for variable in ("OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"):
        with pytest.raises(ChunkdError) as refused:
            configure({**env, variable: "http/json"})
        assert str(refused.value) == f"{variable}=http/json is not supported: use http/protobuf"


def test_with_no_exporter_configured_the_daemon_never_imports_opentelemetry() -> None:
    # The zero-cost promise: installed but not configured, nothing of it is loaded.
    script = (
        "import sys, chunkd, chunkd.cli, chunkd.runtime.supervisor, chunkd.handlers.http,"
        " chunkd.handlers.exec\n"
        "from chunkd.observability.tracing import configure, propagation_headers\n"
        "assert configure({'OTEL_TRACES_EXPORTER': 'none'}) is None and configure({}) is None\n"
        "assert propagation_headers() is None\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


def test_an_exporter_that_is_not_installed_is_one_line_at_start(database) -> None:
    done = run_chunkd(
        "run", "--dsn", database.dsn, "--handler", "traced=trace_handlers:flaky",
        env={"OTEL_TRACES_EXPORTER": "zipkin"},
    )  # fmt: skip
    assert done.code == 2, done.stderr
    assert done.one_error_line() == (
        "OTEL_TRACES_EXPORTER=zipkin: no such span exporter installed: install "
        "the package that provides it, or use console or otlp"
    )


def test_the_console_exporter_writes_to_stderr_and_leaves_stdout_to_the_log() -> None:
    script = (
        "import uuid\n"
        "from chunkd.observability.tracing import configure\n"
        "tracing = configure({'OTEL_TRACES_EXPORTER': 'console'}, worker_id='w')\n"
        "with tracing.chunk(job_id=uuid.uuid4(), kind='k', seq=0, attempt=1, claim_n=1,\n"
        "                   traceparent=None, chunk_id=1) as span:\n"
        "    span.outcome('completed')\n"
        "tracing.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout == ""
    span = json.loads(done.stderr)
    assert span["name"] == "chunkd.chunk" and span["attributes"]["chunkd.outcome"] == "completed"
    assert span["resource"]["attributes"]["service.name"] == "chunkd"
