"""``chunkd.App``: the handlers of an application, registered in code next to the functions.

::

    app = chunkd.App()

    @app.handler("mail-sync", payload=MailPage, job_payload=Mailbox)
    async def sync_page(chunk: chunkd.Chunk[MailPage, Mailbox]) -> dict: ...

``chunkd run myapp.tasks:app`` runs them; ``app.enqueue(conn, "mail-sync", [MailPage(...)],
payload=Mailbox(...))`` creates a job of typed payloads inside the caller's transaction.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from uuid import UUID

from chunkd.app.payloads import PayloadError, PayloadType, payload_type
from chunkd.chunk import Chunk, PermanentError
from chunkd.errors import InvalidInputError
from chunkd.handlers import Handler, call_in_thread, is_async

if TYPE_CHECKING:
    from chunkd.client import AsyncConnection

__all__ = ["App", "Registered"]

F = TypeVar("F", bound=Callable[..., Any])

MAX_KIND_CHARS = 200


@dataclass(frozen=True)
class Registered:
    """One handler of an :class:`App`: the function as written, and its payload types."""

    kind: str
    function: Callable[..., Any]
    payload: PayloadType[Any] | None
    job_payload: PayloadType[Any] | None
    in_thread: bool  # a plain def: run in a worker thread

    @property
    def name(self) -> str:
        module = getattr(self.function, "__module__", None) or "?"
        return f"{module}:{getattr(self.function, '__qualname__', repr(self.function))}"

    def typed(self, chunk: Chunk[Any, Any]) -> Chunk[Any, Any]:
        """``chunk`` with its payloads as this handler's types.

        Raises:
            PermanentError: a payload does not validate (retrying cannot help); the message
                is the validation's.
        """
        if self.payload is None and self.job_payload is None:
            return chunk
        payload, job_payload = chunk.payload, chunk.job_payload
        try:
            if self.payload is not None:
                payload = self.payload.load(payload)
        except PayloadError as exc:
            raise PermanentError(f"payload {exc}") from None
        try:
            if self.job_payload is not None:
                job_payload = self.job_payload.load(job_payload)
        except PayloadError as exc:
            raise PermanentError(f"job payload {exc}") from None
        return chunk.with_payloads(payload, job_payload)

    async def __call__(self, chunk: Chunk[Any, Any]) -> Any:
        typed = self.typed(chunk)
        if self.in_thread:
            # Cancellation (the chunk timeout, a lost lease) stops the wait, not the thread.
            return await call_in_thread(self.function, typed)
        return await self.function(typed)


class App:
    """An application's handlers by kind, declared in code with :meth:`handler`.

    ``chunkd run module:attribute`` (or ``CHUNKD_APP``) runs them, beside ``--handler``
    options and the ``chunkd.handlers`` entry points; :mod:`chunkd.testing` runs them
    in-process. Creating an App has no side effect: it only collects functions.
    """

    def __init__(self) -> None:
        self._registered: dict[str, Registered] = {}
        # Where it was created: chunkd.testing finds it again there to run it in a child process.
        self.module: str | None = sys._getframe(1).f_globals.get("__name__")

    def handler(
        self, kind: str, *, payload: type[Any] | None = None, job_payload: type[Any] | None = None
    ) -> Callable[[F], F]:
        """Registers the decorated function as the handler of ``kind``; returns it unchanged.

        Args:
            kind: the jobs it handles, 1-200 characters, once per app.
            payload: the type of each chunk's payload (a dataclass or a pydantic model); None:
                decoded JSON. The handler receives ``Chunk[payload, job_payload]``.
            job_payload: the type of the job's payload, likewise.

        An ``async def`` runs on the event loop; a plain ``def`` runs in a worker thread (at
        most ``--concurrency`` at once), where cancellation (``--chunk-timeout``, a lost
        lease) fails the chunk on time but cannot stop the thread, which runs to its end.

        Raises:
            ValueError: ``kind`` is empty, too long, or already registered.
            TypeError: the function is not callable, is a generator, or a payload type is
                not a dataclass or pydantic model class; ``@app.handler`` without its kind.
        """
        if callable(kind) and not isinstance(kind, str):
            # @app.handler without parentheses: the function arrived as the kind.
            name = getattr(kind, "__name__", None) or repr(kind)
            raise TypeError(
                f'@app.handler needs the kind it handles: write @app.handler("kind") above '
                f"{name}, not @app.handler"
            )
        if not isinstance(kind, str) or not kind.strip() or len(kind) > MAX_KIND_CHARS:
            raise ValueError(f"a kind must be 1-{MAX_KIND_CHARS} characters, got {kind!r}")
        types = [None if t is None else payload_type(t) for t in (payload, job_payload)]

        def register(function: F) -> F:
            if not callable(function):
                raise TypeError(f"@app.handler({kind!r}) must decorate a function")
            if inspect.isgeneratorfunction(function) or inspect.isasyncgenfunction(function):
                raise TypeError(
                    f"@app.handler({kind!r}): {function.__qualname__} is a generator; a handler "
                    "returns its result (or chunkd.Continue for more chunks)"
                )
            entry = Registered(kind, function, types[0], types[1], not is_async(function))
            if kind in self._registered:
                raise ValueError(
                    f"kind {kind!r} already has a handler: {self._registered[kind].name}"
                )
            self._registered[kind] = entry
            return function

        return register

    @property
    def kinds(self) -> list[str]:
        """The kinds this app handles, sorted."""
        return sorted(self._registered)

    def registered(self, kind: str) -> Registered:
        """The handler of ``kind``. Raises LookupError when it has none."""
        try:
            return self._registered[kind]
        except KeyError:
            known = ", ".join(self.kinds) or "none"
            message = f"this app has no handler for kind {kind!r} (its kinds: {known})"
            raise LookupError(message) from None

    def handlers(self) -> dict[str, Handler]:
        """The handlers as the daemon calls them: ``chunk -> awaitable result``, payloads
        validated (a payload that does not fails its chunk with ``PermanentError``), plain
        functions in a thread."""
        return dict(self._registered)

    def encode(
        self, kind: str, chunks: Sequence[Any], payload: Any = None
    ) -> tuple[list[Any], Any]:
        """The chunks and job payload of a job of ``kind`` as the JSON values the database
        stores: instances of the handler's payload types (or mappings that validate as them),
        or, for an untyped handler, JSON values as they are. For the blocking client:
        ``chunkd.client.sync.create_sync_job(conn, kind, *app.encode(kind, chunks, payload))``.

        Raises:
            InvalidInputError: ``kind`` has no handler here, or a value is not of its type
                (the message names it: ``chunks[3] must be a MailPage, got dict``).
        """
        try:
            entry = self.registered(kind)
        except LookupError as exc:
            raise InvalidInputError(str(exc)) from None
        if isinstance(chunks, str | bytes) or not isinstance(chunks, Sequence):
            raise InvalidInputError(f"chunks must be a list, got {type(chunks).__name__}")
        try:
            values = [_dump(entry.payload, c, f"chunks[{i}]") for i, c in enumerate(chunks)]
            job = None if payload is None else _dump(entry.job_payload, payload, "payload")
        except PayloadError as exc:
            raise InvalidInputError(str(exc)) from None
        return values, job

    async def enqueue(
        self,
        conn: AsyncConnection,
        kind: str,
        chunks: Sequence[Any],
        *,
        payload: Any = None,
        **options: Any,
    ) -> UUID:
        """Creates a job of ``kind`` with typed payloads on the caller's connection, inside its
        open transaction, as :func:`chunkd.create_sync_job` (whose keyword options, such as
        ``max_concurrency``, ``run_at`` or ``dedupe_key``, it takes as they are).

        Returns:
            The job's id (or that of the unfinished job holding ``dedupe_key``).

        Raises:
            InvalidInputError: as :meth:`encode`, or a value chunkd refuses.
        """
        from chunkd.client import create_sync_job

        values, job = self.encode(kind, chunks, payload)
        return await create_sync_job(conn, kind, values, payload=job, **options)


def _dump(tp: PayloadType[Any] | None, value: Any, where: str) -> Any:
    return value if tp is None else tp.dump(value, where)
