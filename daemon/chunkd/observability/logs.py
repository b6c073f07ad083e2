"""structlog set-up: JSON lines for journald and pipes, a readable console on a terminal."""

from __future__ import annotations

import logging
import sys
import traceback
from typing import Any, Literal, TextIO

import orjson
import structlog

__all__ = ["LogFormat", "configure_logging", "exception_text"]

LogFormat = Literal["auto", "json", "console"]


def _orjson_dumps(obj: Any, **kwargs: Any) -> str:
    return orjson.dumps(obj, default=kwargs.get("default")).decode()


def exception_text(exc: BaseException) -> str:
    """``exc``'s traceback as the text a log line carries in ``exception``, as structlog renders
    ``exc_info``: its chained causes and contexts included (not a chain cut with ``raise ...
    from None``), never a frame's local variables, without a final newline, and with
    characters a JSON line cannot hold (a lone surrogate) as backslash escapes."""
    try:
        text = "".join(traceback.format_exception(exc)).rstrip("\n")
    except Exception as failure:  # a broken __str__ is handled by traceback; this is the rest
        text = f"{type(exc).__name__} (its traceback could not be rendered: {failure!r})"
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def configure_logging(
    fmt: LogFormat = "auto", level: str = "info", stream: TextIO | None = None
) -> None:
    """Sets up structlog and the stdlib root logger to write one line per event to ``stream``.

    Args:
        fmt: ``json`` (one JSON object per line), ``console`` (readable, coloured on a
            terminal) or ``auto`` (JSON unless ``stream`` is a terminal).
        level: the lowest level logged: ``debug``, ``info``, ``warning`` or ``error`` (any
            case). Other libraries' loggers log ``info`` and above whatever this says.
        stream: where lines go; None: stdout (``chunkd demo`` passes a file).

    Every exception, whether chunkd's (``log.exception``) or a library's (uvicorn, asyncpg,
    asyncio, through the stdlib), is rendered as its traceback's text: the ``exception`` key
    of the JSON line, or plain lines under the event on the console (never local variables).

    Raises:
        KeyError: ``level`` is not a level name.
    """
    out = sys.stdout if stream is None else stream
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    renderer: structlog.types.Processor = (
        # orjson: one line per chunk transition is on the hot path; it renders ~5x faster.
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if use_json
        # Plain text tracebacks, as in JSON: rich's would print each frame's local variables,
        # and a local may hold a DSN or a token.
        else structlog.dev.ConsoleRenderer(
            colors=out.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    )
    shared: list[structlog.types.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # Libraries (asyncpg's pool, uvicorn, aiohttp, asyncio) log through the stdlib: render them
    # the same way, so every line on stdout is one JSON object. Their exceptions arrive as
    # `exc_info` tuples: format_exc_info turns them into the traceback's text (without it
    # the JSON line would hold the traceback object's repr, "<traceback object at 0x...>").
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=[
                structlog.stdlib.add_logger_name,
                *shared,
                structlog.processors.format_exc_info,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.getLevelNamesMapping()[level.upper()], logging.INFO))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *shared,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=True,
    )
