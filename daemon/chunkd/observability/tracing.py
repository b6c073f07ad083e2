"""OpenTelemetry tracing of chunks and jobs: optional (the ``[otel]`` extra), configured only by
the standard ``OTEL_*`` environment variables, and free when it is off.

A job carries the W3C ``traceparent`` of whoever enqueued it (:func:`current_traceparent` is
what the Python client stores). The daemon runs each chunk attempt in a span ``chunkd.chunk``
(kind ``CONSUMER``): a child of the job's context on the chunk's first delivery, a new trace
*linked* to it on a retry or a re-delivery, so a chunk retried many times never makes one
trace grow without bound; linked or not, a span of the job is recorded only when the sampler
would record a child of the job's context (the enqueuer's "not sampled" holds for retries).
While the handler runs its span is the current one: a Python handler's own spans are its
children, ``http:`` sends ``traceparent`` (and ``tracestate``) to the endpoint, ``exec:``
gets ``TRACEPARENT`` in its environment (:func:`propagation_headers`).
When a traced job finishes, the daemon whose outcome finished it records a short span
``chunkd.job_finished`` in the job's trace with the event ``job_finished``.

Tracing is on when ``OTEL_TRACES_EXPORTER`` names an exporter (``console``, ``otlp``, or any
installed one) or an OTLP endpoint is set, and ``OTEL_SDK_DISABLED`` is not true. Off, the
worker holds no :class:`Tracing` and checks one ``None`` per chunk; opentelemetry is never
imported by the daemon. Everything here works without opentelemetry installed.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict, deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from uuid import UUID

import structlog

from chunkd.errors import ChunkdError

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span

__all__ = [
    "ChunkSpan",
    "Tracing",
    "configure",
    "current_traceparent",
    "exporter_names",
    "propagation_headers",
]

log = structlog.get_logger("chunkd.observability.tracing")

#: Traced jobs remembered per daemon (job id -> the chunks it ran last), for job_finished.
_REMEMBERED_JOBS = 10_000
#: Chunks remembered per traced job: the outcome that finished it is among the last written.
_REMEMBERED_CHUNKS = 64
#: How long the daemon waits at exit for the last spans to be exported (OTLP: a request).
FLUSH_TIMEOUT_S = 5.0

# Set by Tracing while a daemon traces: http: and exec: then pass the current span on.
_propagating = False


def _otel_trace() -> Any:
    """The ``opentelemetry.trace`` module, or None when opentelemetry is not installed."""
    try:
        from opentelemetry import trace
    except ImportError:
        return None
    return trace


def current_traceparent() -> str | None:
    """The W3C ``traceparent`` of the current OpenTelemetry span (``00-<trace id>-<span
    id>-<flags>``), or None: no valid span is current, or opentelemetry is not installed."""
    trace = _otel_trace()
    if trace is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{int(context.trace_flags):02x}"


def propagation_headers() -> dict[str, str] | None:
    """What the current chunk's span passes on (``traceparent``, and ``tracestate`` or
    ``baggage`` when there are any, through the configured propagators, by default W3C trace
    context and baggage), or None when this process does not trace."""
    if not _propagating:
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """The span exporters the environment asks for: ``OTEL_TRACES_EXPORTER`` (comma-separated,
    ``none``: none), else ``otlp`` when an OTLP endpoint is set; none when ``OTEL_SDK_DISABLED``
    is true. Empty: tracing is off."""
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return []
    names = [n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if not names and (
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    ):
        names = ["otlp"]
    return [n for n in names if n != "none"]


def _asker(env: Mapping[str, str]) -> str:
    """The variable that turned tracing on: ``OTEL_TRACES_EXPORTER``, or the OTLP endpoint
    that, set alone, asks for ``otlp`` (for messages that must name what the user set)."""
    if any(n.strip() for n in env.get("OTEL_TRACES_EXPORTER", "").split(",")):
        return "OTEL_TRACES_EXPORTER"
    if env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    return "OTEL_EXPORTER_OTLP_ENDPOINT"


def configure(env: Mapping[str, str] | None = None, *, worker_id: str = "") -> Tracing | None:
    """The daemon's tracing as the ``OTEL_*`` variables of ``env`` (default ``os.environ``)
    ask, or None when they ask for none (the SDK and the exporters read their own settings
    from ``os.environ``). Also makes its provider the global one (handlers'
    spans join the chunk's trace) unless the application has set one already.

    The resource is ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` (``service.name``
    ``chunkd`` when neither names one); sampling is ``OTEL_TRACES_SAMPLER`` and
    ``OTEL_TRACES_SAMPLER_ARG`` (default: parent-based, always on); ``otlp`` is OTLP over
    HTTP/protobuf, configured by the ``OTEL_EXPORTER_OTLP_*`` variables.

    Raises :class:`~chunkd.errors.ChunkdError` (one line) for an exporter that is not installed
    or a protocol the extra does not bring. Without opentelemetry installed it logs one warning
    and returns None.
    """
    env = os.environ if env is None else env
    names = exporter_names(env)
    if not names:
        return None
    try:
        from opentelemetry import trace
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    except ImportError:
        log.warning(
            "tracing.unavailable",
            reason=f"{_asker(env)} asks for {','.join(names)}, but opentelemetry is not "
            "installed: pip install 'chunkd[otel]'; chunkd runs without tracing",
        )
        return None
    attributes = {}
    named = "service.name=" in env.get("OTEL_RESOURCE_ATTRIBUTES", "")
    if not env.get("OTEL_SERVICE_NAME") and not named:
        attributes["service.name"] = "chunkd"
    provider = TracerProvider(resource=Resource.create(attributes))
    for name in names:
        exporter = _exporter(name, env)
        # The console is for a quick look: each span when it ends. Anything else in batches.
        simple = name == "console"
        provider.add_span_processor(
            SimpleSpanProcessor(exporter) if simple else BatchSpanProcessor(exporter)
        )
    current = trace.get_tracer_provider()
    if type(current).__name__ in ("ProxyTracerProvider", "NoOpTracerProvider"):
        trace.set_tracer_provider(provider)
    return Tracing(provider, worker_id=worker_id, owned=True)


def _exporter(name: str, env: Mapping[str, str]) -> Any:
    from importlib.metadata import entry_points

    if name == "console":
        import sys

        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        # stderr: every line on stdout stays one JSON log line (chunkd.observability.logs).
        return ConsoleSpanExporter(out=sys.stderr)
    entry = name
    if name == "otlp":
        said = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
        if not env.get(said):
            said = "OTEL_EXPORTER_OTLP_PROTOCOL"
        protocol = env.get(said) or "http/protobuf"
        if protocol not in ("http/protobuf", "grpc"):
            raise ChunkdError(f"{said}={protocol} is not supported: use http/protobuf")
        entry = "otlp_proto_http" if protocol == "http/protobuf" else "otlp_proto_grpc"
    found = entry_points(group="opentelemetry_traces_exporter", name=entry)
    if not found:
        hint = (
            "pip install opentelemetry-exporter-otlp-proto-grpc (chunkd[otel] brings OTLP over "
            "HTTP: OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf)"
            if entry == "otlp_proto_grpc"
            else "install the package that provides it, or use console or otlp"
        )
        asked = f"{_asker(env)}={name}" if _asker(env) == "OTEL_TRACES_EXPORTER" else _asker(env)
        raise ChunkdError(f"{asked}: no such span exporter installed: {hint}")
    return next(iter(found)).load()()


class Tracing:
    """The spans of one daemon: :meth:`chunk` per chunk attempt, :meth:`job_finished` per
    traced job it finished. ``provider``: an OpenTelemetry SDK ``TracerProvider`` (tests pass
    one with an in-memory exporter); ``owned``: :meth:`shutdown` shuts it down."""

    def __init__(self, provider: TracerProvider, *, worker_id: str = "", owned: bool = False):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from chunkd.version import __version__

        global _propagating
        _propagating = True
        self.provider = provider
        self.worker_id = worker_id
        self._owned = owned
        self._tracer = provider.get_tracer("chunkd", __version__)
        self._w3c = TraceContextTextMapPropagator()
        self._jobs: OrderedDict[UUID, deque[int]] = OrderedDict()

    def parent(self, traceparent: str | None) -> Any:
        """The span context a W3C ``traceparent`` names, or None for None or a malformed one."""
        if traceparent is None:
            return None
        from opentelemetry import trace

        context = self._w3c.extract({"traceparent": traceparent})
        span_context = trace.get_current_span(context).get_span_context()
        return span_context if span_context.is_valid else None

    @contextmanager
    def chunk(
        self, *, job_id: UUID, kind: str, seq: int, attempt: int, claim_n: int,
        traceparent: str | None, chunk_id: int,
    ) -> Iterator[ChunkSpan]:  # fmt: skip
        """The span of one chunk attempt, current while the block runs (the handler's call).

        A child of ``traceparent`` on the chunk's first delivery (``attempt`` 1, ``claim_n``
        1), a new trace linked to it otherwise. Tell its outcome with :meth:`ChunkSpan.outcome`;
        a block left by an exception (the daemon cancelled the handler: a lost lease, a stop)
        ends it with outcome ``interrupted``.
        """
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind, Status, StatusCode

        job = self.parent(traceparent)
        attributes: dict[str, str | int] = {
            "chunkd.kind": kind,
            "chunkd.job_id": str(job_id),
            "chunkd.chunk.seq": seq,
            "chunkd.chunk.attempt": attempt,
            "chunkd.chunk.claim": claim_n,
            "chunkd.worker_id": self.worker_id,
        }
        first = attempt == 1 and claim_n == 1
        span = self._start("chunkd.chunk", job, SpanKind.CONSUMER, attributes, linked=not first)
        token = otel_context.attach(trace.set_span_in_context(span))
        told = ChunkSpan(span)
        try:
            yield told
            if job is not None:
                self._ran(job_id, chunk_id)
        except BaseException as exc:
            if not told.told:
                span.set_attribute("chunkd.outcome", "interrupted")
                span.set_status(Status(StatusCode.ERROR, f"interrupted: {type(exc).__name__}"))
            raise
        finally:
            otel_context.detach(token)
            span.end()

    def _start(
        self, name: str, job: Any, kind: Any, attributes: dict[str, str | int], *, linked: bool
    ) -> Span:
        """A span for a job whose context is ``job`` (None: untraced, a root span): a child of
        it, or (``linked``) the root of a new trace with a link to it. Whatever the link, the
        job's sampling decision holds: a linked span is recorded only when the sampler would
        record a child of the job's context (by default, when the enqueuer's ``traceparent``
        says sampled, ``-01``). Not recorded, it is a span of a new trace flagged not sampled,
        so whatever it passes on (``http:``, ``exec:``, a handler's spans) is not sampled
        either. Never a child of the daemon's own context."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.sdk.trace.sampling import Decision
        from opentelemetry.trace import Link, SpanContext, TraceFlags

        empty = otel_context.Context()
        if job is None:
            return self._tracer.start_span(name, context=empty, kind=kind, attributes=attributes)
        as_child = trace.set_span_in_context(trace.NonRecordingSpan(job), empty)
        if not linked:
            return self._tracer.start_span(name, context=as_child, kind=kind, attributes=attributes)
        links = [Link(job, {"chunkd.link": "job"})]
        sampler, ids = self.provider.sampler, self.provider.id_generator
        decided = sampler.should_sample(as_child, job.trace_id, name, kind, attributes, links)
        if decided.decision is Decision.DROP:
            unsampled = TraceFlags(TraceFlags.DEFAULT)
            new = SpanContext(ids.generate_trace_id(), ids.generate_span_id(), False, unsampled)
            return trace.NonRecordingSpan(new)
        return self._tracer.start_span(
            name, context=empty, kind=kind, links=links, attributes=attributes
        )

    def _ran(self, job_id: UUID, chunk_id: int) -> None:
        chunks = self._jobs.get(job_id)
        if chunks is None:
            chunks = self._jobs[job_id] = deque(maxlen=_REMEMBERED_CHUNKS)
            if len(self._jobs) > _REMEMBERED_JOBS:
                self._jobs.popitem(last=False)
        else:
            self._jobs.move_to_end(job_id)
        chunks.append(chunk_id)

    def ran(self, job_id: UUID) -> list[int]:
        """The internal ids of the chunks of traced job ``job_id`` whose handlers this daemon
        ran last (at most 64; of the last 10,000 traced jobs), empty for any other job."""
        return list(self._jobs.get(job_id, ()))

    def job_finished(self, job_id: UUID, info: Mapping[str, Any]) -> None:
        """Records that traced job ``job_id`` finished: a span ``chunkd.job_finished``, a child
        of the job's context, with the event ``job_finished`` (its status and counts, from
        ``info``: ``kind``, ``overall_status``, the chunk counts, ``traceparent``)."""
        from opentelemetry import context as otel_context
        from opentelemetry import trace

        self._jobs.pop(job_id, None)
        job = self.parent(info.get("traceparent"))
        if job is None:
            return
        parent = trace.set_span_in_context(trace.NonRecordingSpan(job), otel_context.Context())
        attributes: dict[str, str | int] = {
            "chunkd.job_id": str(job_id),
            "chunkd.kind": str(info["kind"]),
            "chunkd.job.status": str(info["overall_status"]),
            "chunkd.job.total_chunks": int(info["total_chunks"]),
            "chunkd.job.completed_chunks": int(info["completed_chunks"]),
            "chunkd.job.failed_chunks": int(info["failed_chunks"]),
            "chunkd.job.cancelled_chunks": int(info["cancelled_chunks"]),
            "chunkd.worker_id": self.worker_id,
        }
        now_ns = time.time_ns()
        span = self._tracer.start_span(
            "chunkd.job_finished", context=parent, attributes=attributes, start_time=now_ns
        )
        span.add_event("job_finished", attributes, timestamp=now_ns)
        span.end(end_time=now_ns)

    def shutdown(self) -> None:
        """Exports what is left (at most :data:`FLUSH_TIMEOUT_S`) and, when this daemon made
        the provider, shuts it down. Blocking: call it from a thread."""
        global _propagating
        _propagating = False
        self.provider.force_flush(int(FLUSH_TIMEOUT_S * 1000))
        if self._owned:
            self.provider.shutdown()


class ChunkSpan:
    """The span of one chunk attempt, told its outcome once."""

    __slots__ = ("span", "told")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.told = False

    def outcome(
        self, outcome: str, *, error: str | None = None, raised: BaseException | None = None
    ) -> None:
        """Sets ``chunkd.outcome`` (``completed``, ``error`` retryable, ``failed`` for good,
        ``snoozed``) and, for an error, the status and the exception the handler raised."""
        from opentelemetry.trace import Status, StatusCode

        self.told = True
        self.span.set_attribute("chunkd.outcome", outcome)
        if outcome in ("error", "failed"):
            if raised is not None:
                try:
                    self.span.record_exception(raised)
                except Exception:  # an exception whose str() fails: the status still says
                    pass
            self.span.set_status(Status(StatusCode.ERROR, error))
