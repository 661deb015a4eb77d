"""The service's subcommand of ``ranker``: ``serve``. :func:`register` adds it to the command
line :mod:`ranker.cli` builds (found through the ``ranker.commands`` entry point).

Start-up errors (no artifact, a corrupt one, an invalid ranking config, a bad ``RANKER_*``
value) end ``ranker serve`` like every other command: one ``error: ...`` line on stderr, exit
status 2, and one structured record in the JSON log. The model is therefore loaded before
uvicorn starts (inside uvicorn, a failing lifespan is a traceback and exit status 3): with one
worker the loaded state is handed to the app; with several, a spawned process loads it once to
check, and each worker loads its own.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING, Any

from ranker.errors import ConfigError, RankerError

if TYPE_CHECKING:
    from service.settings import Settings

log = logging.getLogger("ranker.service")


def load_settings() -> Settings:
    """``Settings()`` from the environment; an invalid value is a :class:`ConfigError` naming
    the variable, on one line."""
    from pydantic import ValidationError

    from service.settings import Settings

    try:
        return Settings()
    except ValidationError as e:
        problems = "; ".join(
            f"RANKER_{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            for err in e.errors(include_url=False)
        )
        raise ConfigError(problems) from None


def start_up_error() -> str | None:
    """Loads what ``RANKER_*`` names as a worker would and says what is wrong, or None. Run in
    a spawned process for ``--workers N``: the supervisor never holds a model."""
    from service.state import load_serving_state

    try:
        load_serving_state(load_settings())
    except RankerError as e:
        return str(e)
    return None


def cmd_serve(a: argparse.Namespace) -> None:
    import logging.config
    import os

    import uvicorn

    for key, value in (("ARTIFACT", a.artifact), ("RANKING_CONFIG", a.ranking)):
        if value:
            os.environ[f"RANKER_{key}"] = str(value)
    from ranker.cpu import usable_cpus
    from service.logs import logging_config
    from service.observability import multiprocess_metrics

    if a.workers < 1:
        raise RankerError(f"--workers {a.workers}: at least 1")
    cpus = usable_cpus()
    if a.workers > cpus:
        print(
            f"warning: --workers {a.workers} > {cpus} usable CPUs (affinity, cgroup quota)",
            file=sys.stderr,
        )
    settings = load_settings()  # each worker runs RANKER_THREADS or 1 thread (default_threads)
    host = a.host or settings.host
    port = a.port if a.port is not None else settings.port
    options: dict[str, Any] = {
        "host": host,
        "port": port,
        "log_level": settings.log_level,
        "log_config": logging_config(settings.log_level),  # JSON lines, in every worker
        "access_log": False,  # the service's request log replaces uvicorn's
    }
    logging.config.dictConfig(options["log_config"])  # the start-up lines are JSON lines too
    if settings.exposure_dir is not None:  # a directory it cannot write: one line, not a trace
        from service.exposure_log import prepare_log_dir

        try:
            prepare_log_dir(settings.exposure_dir)
        except RankerError as e:
            log.error("start-up failed: %s", e)
            raise
    state = None
    if a.workers == 1:
        from service.state import load_serving_state

        try:
            state = load_serving_state(settings)
        except RankerError as e:
            log.error("start-up failed: %s", e)
            raise
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        spawn = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(1, mp_context=spawn) as pool:
            error = pool.submit(start_up_error).result()
        if error is not None:
            log.error("start-up failed: %s", error)
            raise RankerError(error)
    from service.shutdown import exit_zero_on_sigterm

    exit_zero_on_sigterm()  # uvicorn re-raises SIGTERM after draining: exit 0, not 143
    with multiprocess_metrics(a.workers):  # PROMETHEUS_MULTIPROC_DIR before workers start
        if a.workers > 1:
            # Each worker builds its own app from the same RANKER_* environment: uvicorn needs
            # an import string for that, not an app object.
            uvicorn.run("service.app:create_app", factory=True, workers=a.workers, **options)
        else:
            from service.app import create_app

            app = create_app(settings, state)
            del state  # the app holds it until a reload replaces it; this frame must not
            uvicorn.run(app, **options)


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
