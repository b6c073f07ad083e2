import asyncpg
import pytest

from myapp import tasks


@pytest.fixture
async def db(chunkd_dsn, monkeypatch):
    """chunkd's fresh test database (the chunkd_dsn fixture), with myapp's table, as the
    handlers find it (CHUNKD_DSN)."""
    monkeypatch.setenv("CHUNKD_DSN", chunkd_dsn)
    conn = await asyncpg.connect(chunkd_dsn)
    await conn.execute(tasks.SCHEMA)
    yield conn
    await conn.close()
