"""chunkd: a durable chunk-processing daemon for PostgreSQL."""

from chunkd.chunk import Chunk, PermanentError, RetryLater
from chunkd.version import __version__

__all__ = ["Chunk", "PermanentError", "RetryLater", "__version__"]
