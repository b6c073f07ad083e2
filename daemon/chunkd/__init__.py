"""chunkd: a durable chunk-processing daemon for PostgreSQL."""

from chunkd.chunk import Chunk, PermanentError, RetryLater

__all__ = ["Chunk", "PermanentError", "RetryLater", "__version__"]
__version__ = "0.1.0"
