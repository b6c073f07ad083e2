"""The long-horizon harness, unchanged, run natively: a throwaway cluster, no Docker.

Runs inside the harness's own virtualenv (Python >= 3.12, its pinned dependencies), not
chunkd's. It imports the harness from ``--harness-src`` and, before handing its CLI the
remaining arguments, replaces at run time (its files are not edited):

- the Docker Compose Postgres (``docker compose up/stop/start/down -v``): a throwaway
  cluster from local server binaries (chunkd's own ``chunkd/demo/cluster.py``, loaded by
  path since chunkd is not installed here), on 127.0.0.1 only, with the harness's
  ``postgres.conf`` settings (``listen_addresses`` aside), a ``bench`` superuser and a fresh
  data directory wherever the harness would have run ``down -v``; its ``postgres-restart``
  chaos phase stops and starts that cluster;
- its Docker builders and launchers: ``chunkd`` is registered (bench/harness_adapter, run by
  chunkd's Python), and the upstream ``procrastinate-bench/main.py`` is launched with a
  native Python holding its pinned dependencies instead of ``docker run``.

Usage (bench/harness_run.py builds the command)::

    python native_harness.py --harness-src DIR --chunkd-python PY --procrastinate-python PY \\
        [--pg-bin-dir DIR] -- run --systems chunkd,procrastinate --phase ...
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CLUSTER_PY = REPO / "daemon" / "chunkd" / "demo" / "cluster.py"


def _load_cluster_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("chunkd_cluster", CLUSTER_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["chunkd_cluster"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def _postgres_conf(path: Path) -> dict[str, str]:
    """``name = value`` lines of the harness's postgres.conf, as -c settings."""
    settings: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "=" in line:
            name, value = (part.strip() for part in line.split("=", 1))
            settings[name] = value.strip("'")
    settings["listen_addresses"] = "127.0.0.1"  # never '*': nothing but loopback here
    return settings


def _free_port(preferred: int) -> int:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
        except OSError:
            s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class NativePostgres:
    """What the harness's compose helpers did, on a throwaway cluster."""

    def __init__(self, harness_src: Path, bin_dir: str | None) -> None:
        self._cluster_mod = _load_cluster_module()
        self._settings = _postgres_conf(harness_src / "postgres.conf")
        self._bin_dir = Path(bin_dir) if bin_dir else self._cluster_mod.find_bin_dir()
        self.cluster: Any = None
        # The postmaster gets a parent-death signal, which Linux sends when the *thread*
        # that started it ends; the harness's postgres-restart phase starts it from a
        # short-lived thread. So every start and stop runs on this one long-lived thread.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="native-pg")

    def start(self, _pg_image: str = "") -> None:
        """``docker compose up``: a fresh cluster unless one is already up."""
        self._thread.submit(self._start).result()

    def _start(self) -> None:
        import psycopg
        from bench_harness import adapters

        if self.cluster is not None and self.cluster.pid is not None:
            return
        if self.cluster is None:
            adapters.PG_PORT = _free_port(adapters.PG_PORT)
            self.cluster = self._cluster_mod.PostgresCluster(
                fsync=True,
                bin_dir=self._bin_dir,
                extra_settings=self._settings,
                port=adapters.PG_PORT,
            )
            self.cluster.start()
            with psycopg.connect(self.cluster.dsn("postgres"), autocommit=True) as conn:
                conn.execute(
                    f"CREATE ROLE {adapters.PG_USER} SUPERUSER LOGIN PASSWORD '{adapters.PG_PASS}'"
                )
            print(
                f"[native-pg] PostgreSQL {self._bin_dir} on 127.0.0.1:{adapters.PG_PORT}",
                file=sys.stderr,
            )
        else:
            self.cluster.start()
        self._wait_query_ready()

    def _wait_query_ready(self) -> None:
        import psycopg
        from bench_harness.adapters import pg_url

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(pg_url("postgres"), autocommit=True) as conn:
                    conn.execute("SELECT 1")
                return
            except psycopg.Error:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def pause(self, _pg_image: str = "") -> None:
        """``docker compose stop postgres``: down, data kept."""
        if self.cluster is not None:
            self._thread.submit(self.cluster.stop).result()

    def restart(self, pg_image: str = "") -> None:
        self.pause(pg_image)
        self.start(pg_image)

    def remove(self, _pg_image: str = "") -> None:
        """``docker compose down -v``: down and its data gone."""
        if self.cluster is not None:
            self._thread.submit(self.cluster.cleanup).result()
            self.cluster = None


def _git_revision(path: Path) -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(path), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def install(args: argparse.Namespace) -> None:
    """Swap the compose lifecycle and the Docker adapters for native ones."""
    from bench_harness import adapters, orchestrator, versions

    pg = NativePostgres(args.harness_src, args.pg_bin_dir)
    orchestrator.start_postgres = pg.start
    orchestrator.stop_postgres = pg.remove
    orchestrator._compose_stop_postgres = pg.pause
    orchestrator._compose_start_postgres = pg.start
    orchestrator._restart_postgres = pg.restart

    revision = _git_revision(REPO)

    def no_build(skip: bool) -> None:
        return None

    def launch_chunkd(manifest: Any, overrides: dict[str, str]) -> Any:
        env = adapters._base_env(manifest, overrides)
        env["CHUNKD_HARNESS_REVISION"] = f"chunkd {revision}"
        return adapters.LaunchSpec(
            argv=[args.chunkd_python, str(HERE / "chunkd_adapter.py")], env=env
        )

    procrastinate_dir = args.harness_src / "procrastinate-bench"

    def launch_procrastinate(manifest: Any, overrides: dict[str, str]) -> Any:
        return adapters.LaunchSpec(
            argv=[args.procrastinate_python, "main.py"],
            env=adapters._base_env(manifest, overrides),
            cwd=str(procrastinate_dir),
        )

    adapters.ADAPTERS["chunkd"] = adapters.AdapterEntry(
        bench_dir=HERE, builder=no_build, launcher=launch_chunkd
    )
    adapters.ADAPTERS["procrastinate"] = adapters.AdapterEntry(
        bench_dir=procrastinate_dir, builder=no_build, launcher=launch_procrastinate
    )
    versions._CAPTURE["chunkd"] = lambda: {
        "source": "chunkd git checkout",
        "commit": revision,
        "adapter": "bench/harness_adapter",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--harness-src", type=Path, required=True)
    parser.add_argument("--chunkd-python", required=True)
    parser.add_argument("--procrastinate-python", required=True)
    parser.add_argument("--pg-bin-dir", default=os.environ.get("CHUNKD_HARNESS_PG_BIN"))
    parser.add_argument("harness_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    harness_args = args.harness_args[1:] if args.harness_args[:1] == ["--"] else args.harness_args
    args.harness_src = args.harness_src.resolve()
    sys.path.insert(0, str(args.harness_src))
    install(args)
    from bench_harness.orchestrator import main as harness_main

    return int(harness_main(harness_args))


if __name__ == "__main__":
    sys.exit(main())
