"""chunkd: a durable chunk-processing daemon for PostgreSQL."""

from chunkd.chunk import Chunk, Continue, PermanentError, RetryLater
from chunkd.version import __version__

__all__ = ["Chunk", "Continue", "PermanentError", "RetryLater", "__version__"]
