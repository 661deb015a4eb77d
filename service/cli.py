"""The service's subcommand of ``ranker``: ``serve``. :func:`register` adds it to the command
line :mod:`ranker.cli` builds (found through the ``ranker.commands`` entry point)."""

from __future__ import annotations

import argparse
from typing import Any

from ranker.errors import RankerError


def cmd_serve(a: argparse.Namespace) -> None:
    import os

    import uvicorn

    for key, value in (("ARTIFACT", a.artifact), ("RANKING_CONFIG", a.ranking)):
        if value:
            os.environ[f"RANKER_{key}"] = str(value)
    from service.logs import logging_config
    from service.observability import multiprocess_metrics
    from service.settings import Settings, threads_per_worker

    if a.workers < 1:
        raise RankerError(f"--workers {a.workers}: at least 1")
    if a.workers > 1 and "RANKER_THREADS" not in os.environ:
        os.environ["RANKER_THREADS"] = str(threads_per_worker(a.workers, os.cpu_count()))
    settings = Settings()
    host = a.host or settings.host
    port = a.port if a.port is not None else settings.port
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level),  # JSON lines, in every worker
        "access_log": False,  # the service's request log replaces uvicorn's
    }
    from service.shutdown import exit_zero_on_sigterm

    exit_zero_on_sigterm()  # uvicorn re-raises SIGTERM after draining: exit 0, not 143
    with multiprocess_metrics(a.workers):  # PROMETHEUS_MULTIPROC_DIR before workers start
        if a.workers > 1:
            # Each worker builds its own app from the same RANKER_* environment: uvicorn needs
            # an import string for that, not an app object.
            uvicorn.run("service.app:create_app", factory=True, workers=a.workers, **options)
        else:
            from service.app import create_app

            uvicorn.run(create_app(settings), **options)


def register(sub: argparse._SubParsersAction) -> None:
    """Adds ``serve`` to ``ranker``'s subparsers."""
    s = sub.add_parser("serve", help="run the ranking service (settings from RANKER_* env vars)")
    s.add_argument("--artifact", help="artifact version dir or its parent (RANKER_ARTIFACT)")
    s.add_argument("--ranking", help="ranking config TOML (RANKER_RANKING_CONFIG)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument(
        "--workers",
        type=int,
        default=1,
        help="worker processes (metrics add up across them: docs/observability.md)",
    )
    s.set_defaults(func=cmd_serve)
