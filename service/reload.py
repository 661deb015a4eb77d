"""Hot reload: a new artifact version or ranking config is loaded, checked and warmed off the event
loop, then swapped in as a whole ``ServingState``; anything that fails leaves the old one serving.

This is the bar Triton and TF Serving set: a model takes traffic only once it has loaded and
answered one forward pass, and a model that fails to load never replaces a working one. Requests
in flight keep the state they started with (``serving_state`` hands each request the state of
its arrival), so a swap drops nothing and needs no lock on the request path.

Two triggers share one code path (:meth:`Reloader.reload`, one at a time):

* a poll every ``RANKER_RELOAD_INTERVAL_S`` seconds (0: off) of the artifact root (its newest
  version, :func:`ranker.artifact.resolve`) and of the ranking config file (its content);
* ``POST /admin/reload``, with the bearer token ``RANKER_ADMIN_TOKEN`` (no token configured: the
  endpoint answers 404, as if it did not exist). Its body may name a version, which must be a
  plain directory name found under the configured root; naming one pins it (the poll stops
  following the newest version, for a rollback) until a reload without a version.

A refused input (checksum mismatch, wrong format version, heads the ranking config does not fit,
non-finite predictions, an invalid ranking config) is logged, reported on ``/readyz``
(``last_reload_error``) and not tried again by the poll until it changes on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import hmac
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from ranker.artifact import Artifact, list_versions, load_artifact, resolve
from ranker.errors import ArtifactError, ConfigError, RankerError, RequestError
from ranker.scoring import RankingConfig, RankingFormula, load_ranking_config
from service.engine import (
    ServingModel,
    encode_context,
    engine_line,
    live_state,
    make_predictor,
    parameter_limit,
    score_rows,
)
from service.schemas import Problem, ReloadRequest, ReloadResult, ValidationProblem
from service.settings import Settings
from service.state import ServingState
from service.store import FeatureStore, InProcessStore, Lookup

log = logging.getLogger("ranker.service.reload")

# A version name as save_artifact writes them (and anything like them): no separator, no "..",
# not absolute; it is then looked up among the root's versions, never joined onto a path.
VERSION_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
WARM_ROWS = 8  # candidates in the warm-up forward pass: enough to run every layer once
REFREEZE_DELAY_S = 2.0  # after a swap, long enough for requests on the old state to finish
# An absolute path in a message: a slash at the start or after a space, quote or parenthesis.
_ABSOLUTE_PATH = re.compile(r"(?<![^\s'\"(])/[^\s'\":;,()]+")

Stamp = tuple[tuple[str, int, int], ...]


def artifact_stamp(path: Path) -> Stamp:
    """Names, sizes and modification times of a version's files: changes when anything is
    rewritten, so a refused version is tried again once someone fixes it in place."""
    try:
        return tuple(
            (f.name, st.st_size, st.st_mtime_ns)
            for f in sorted(path.iterdir())
            for st in [f.stat()]
        )
    except OSError:
        return ()


def _file_digest(path: Path) -> str | None:
    """The ranking config's content hash (the file is small); None when it cannot be read."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def warm(model: ServingModel, formula: RankingFormula) -> None:
    """One forward pass on default features: pages the weights in, allocates the buffers, and
    refuses a model whose predictions or scores are not finite (weights that pass the
    checksums can still be garbage: a NaN written at export)."""
    enc = model.artifact.encoder
    lookup = Lookup(
        enc.defaults("user"), enc.defaults("video", WARM_ROWS), True, np.ones(WARM_ROWS, bool)
    )
    try:
        scores, preds = score_rows(model, formula, lookup, encode_context(enc, {}))
    except RankerError:
        raise
    except Exception as e:  # noqa: BLE001 - a model that cannot run one pass is refused
        raise ArtifactError(f"warm-up pass failed: {type(e).__name__}: {e}") from None
    bad = [t for t, p in preds.items() if not np.isfinite(p).all()]
    if bad or not np.isfinite(scores).all():
        what = f"predictions of {bad}" if bad else "scores"
        raise ArtifactError(f"non-finite {what} on default features")


def store_for(model_artifact: Artifact, old: FeatureStore, settings: Settings) -> FeatureStore:
    """The feature store for a new model.

    The in-process store holds the tables encoded with the old model's encoder: it is rebuilt
    with the new one (re-reading the tables). The Redis store holds raw values, so its
    connection pool is shared; only the decoding (bound to an encoder) is new. Any other store
    (a test's) is kept as it is.
    """
    if isinstance(old, InProcessStore):
        return InProcessStore.from_tables(
            model_artifact.config, model_artifact.encoder, settings.users, settings.videos
        )
    from service.redis_store import RedisStore

    if isinstance(old, RedisStore):
        # New decoders and entity caches: cached rows are encoded with the old model's encoder.
        return RedisStore(
            old.client,
            model_artifact.encoder,
            settings.redis_prefix,
            old.timeout_s,
            old.retry_s,
            old.where,
            old.cache_entries,
        )
    return old


@dataclass
class _Plan:
    """What one reload decided (built in a worker thread, applied on the event loop)."""

    model: ServingModel
    formula: RankingFormula


class Reloader:
    """Polls and reloads the serving state of one app; see the module docstring."""

    def __init__(self, app: FastAPI, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.root = Path(settings.artifact)
        self.interval = settings.reload_interval_s
        self.reloads = 0  # successful swaps since start
        self.pinned: Path | None = None
        self.model_error: str | None = None
        self.ranking_error: str | None = None
        # (path, stamp) of the artifact last refused; the poll skips it until it changes
        self._failed_model: tuple[Path, Stamp] | None = None
        # (content hash of the ranking config, model version) last looked at, loaded or refused:
        # the poll reads the file again when either changes (a config refused because it does
        # not fit this model may fit the next). None: not compared with what serves yet, so the
        # first poll reads it once (it may have changed during start-up).
        self._ranking_seen: tuple[str | None, str] | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def state(self) -> ServingState:
        return self.app.state.serving

    @property
    def last_error(self) -> str | None:
        """Why the newest artifact or ranking config is not what serves; None when it is. For
        ``/readyz`` and the admin answer: versions and files by name, never the machine's paths
        (the log has those)."""
        errors = [e for e in (self.model_error, self.ranking_error) if e]
        return self.public("; ".join(errors)) or None

    def public(self, text: str) -> str:
        """``text`` with paths replaced: a path under the artifact root by ``version <name>``
        (and the file below it), the root by ``RANKER_ARTIFACT``, the ranking config by its
        file name, and any other absolute path by its last component."""
        named: list[tuple[Path, str]] = [(self.root, "RANKER_ARTIFACT")]
        if self.settings.ranking_config is not None:
            ranking = Path(self.settings.ranking_config)
            named.insert(0, (ranking, ranking.name))
        for path, label in named:
            forms = sorted({str(path), str(path.absolute()), str(path.resolve())}, key=len)
            for form in reversed(forms):  # longest first: one form may prefix another
                if path == self.root:
                    text = text.replace(form + "/", "version ")
                text = text.replace(form, label)
        return _ABSOLUTE_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), text)

    def start(self) -> None:
        if self.interval > 0:
            self._task = asyncio.create_task(self._poll(), name="ranker-reload-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.reload(explicit=False)
            except Exception:  # noqa: BLE001 - a bug here must not end the polling for good
                log.exception("reload poll failed; still serving %s", self.state.model.version)

    def version_path(self, name: str) -> Path:
        """The version directory called ``name`` under the configured root, or a
        :class:`RequestError`: names are matched against the root's versions, never joined
        onto a path (and the load checks the match lies inside the root, symlinks resolved)."""
        if not VERSION_NAME.fullmatch(name):
            raise RequestError(f"version: {name!r} is not a version name")
        try:
            versions = list_versions(self.root)
        except ArtifactError as e:
            raise RequestError(f"version: {e}") from None
        matches = [v for v in versions if v.name == name]
        if not matches:
            raise RequestError(f"version: no version {name!r} under the artifact root")
        if len(matches) > 1:
            raise RequestError(f"version: {name!r} is ambiguous under the artifact root")
        return matches[0]

    def _inside_root(self, path: Path) -> bool:
        root = self.root.resolve()
        return path.resolve() == root or path.resolve().is_relative_to(root)

    async def reload(self, version: str | None = None, explicit: bool = True) -> ReloadResult:
        """Loads what changed and swaps it in; returns what serves afterwards and what was
        refused. ``explicit`` (the admin endpoint) retries inputs refused before and, without a
        ``version``, ends a pin."""
        async with self._lock:
            pinned_before = self.pinned
            if version is not None:  # lists a directory: off the event loop too
                self.pinned = await asyncio.to_thread(self.version_path, version)
            elif explicit:
                self.pinned = None
            before = self.state
            plan = await asyncio.to_thread(self._plan, before, explicit)
            if version is not None and plan.model.artifact.path != self.pinned:
                self.pinned = pinned_before  # the named version was refused: no pin taken
            if plan.model.store is not before.model.store:
                # A new Redis store reads the current version's meta now, not on a request.
                ok, detail = await plan.model.store.ready()
                (log.info if ok else log.warning)(
                    "feature store %s: %s", plan.model.store.name, detail
                )
            model_changed = plan.model is not before.model
            ranking_changed = plan.formula is not before.formula
            if model_changed or ranking_changed:
                self.app.state.serving = ServingState(plan.model, plan.formula)
                self.reloads += 1
                log.info(
                    "now serving model %s (was %s), ranking %s (was %s); %s",
                    plan.model.version,
                    before.model.version,
                    plan.formula.version,
                    before.formula.version,
                    engine_line(plan.model.predictor),
                )
                asyncio.get_running_loop().call_later(REFREEZE_DELAY_S, _refreeze)
            return ReloadResult(
                model_version=plan.model.version,
                ranking_version=plan.formula.version,
                model_changed=model_changed,
                ranking_changed=ranking_changed,
                pinned_version=self.pinned.name if self.pinned else None,
                error=self.last_error,
            )

    def _plan(self, current: ServingState, explicit: bool) -> _Plan:
        """Runs in a worker thread: finds what changed, loads, fits and warms it. Every failure
        is recorded on ``self`` and falls back to what serves now."""
        plan = _Plan(current.model, current.formula)
        configs = [current.formula.config]
        new_config = self._changed_ranking_config(current, explicit)
        if new_config is not None:
            configs.insert(0, new_config)
        models = [current.model]
        new_model = self._changed_model(current, explicit)
        if new_model is not None:
            models.insert(0, new_model)
            if self.settings.ranking_config is None:  # the artifact's own ranking comes with it
                configs.insert(0, new_model.artifact.ranking)
        # The first (model, config) pair that fits and warms, new ones first: a new model and a
        # new config naming its new head arrive together, and either alone may not fit the other.
        errors: dict[tuple[int, int], str] = {}
        pairs = [(mi, ci) for mi in range(len(models)) for ci in range(len(configs))]
        for mi, ci in pairs:
            model, config = models[mi], configs[ci]
            if model is current.model and config is current.formula.config:
                break  # what serves now: always fits
            try:
                formula = RankingFormula(config, model.artifact.config.task_names)
                if model is not current.model:
                    warm(model, formula)
            except RankerError as e:
                errors[mi, ci] = str(e)
                continue
            plan.model, plan.formula = model, formula
            break
        if new_model is not None and plan.model is not new_model:
            # the reason with the config that serves (the new model's last pair)
            path = new_model.artifact.path
            self._refuse_model(path, f"{path}: {errors[0, len(configs) - 1]}")
        if new_config is not None:
            if plan.formula.config is new_config:
                self.ranking_error = None
            else:
                chosen = next(i for i, m in enumerate(models) if m is plan.model)
                self.ranking_error = f"ranking config refused: {errors[chosen, 0]}"
                log.error("%s; still serving ranking %s", self.ranking_error, plan.formula.version)
        if new_model is not None and plan.model is new_model:
            self.model_error, self._failed_model = None, None
        return plan

    def _changed_ranking_config(
        self, current: ServingState, explicit: bool
    ) -> RankingConfig | None:
        """The ranking config file's content when it differs from what serves and parses; an
        unreadable or invalid file is refused (recorded), the served weights stay. None without
        a ranking file: the artifact's own ranking arrives with its model."""
        if self.settings.ranking_config is None:
            return None
        path = Path(self.settings.ranking_config)
        digest = _file_digest(path)
        seen = (digest, current.model.version)
        if self._ranking_seen == seen and not explicit:
            return None
        self._ranking_seen = seen
        try:
            config = load_ranking_config(path)
        except ConfigError as e:
            self.ranking_error = f"ranking config refused: {e}"
            log.error("%s; still serving ranking %s", self.ranking_error, current.formula.version)
            return None
        if config == current.formula.config:
            self.ranking_error = None
            return None
        return config

    def _changed_model(self, current: ServingState, explicit: bool) -> ServingModel | None:
        """The newest (or pinned) version, loaded and verified, when it is not what serves."""
        try:
            target = self.pinned or resolve(self.root)
        except ArtifactError as e:
            self.model_error = f"artifact root: {e}"
            log.error("%s; still serving model %s", self.model_error, current.model.version)
            return None
        if target == current.model.artifact.path:
            self.model_error, self._failed_model = None, None
            return None
        stamp = artifact_stamp(target)
        if not explicit and self._failed_model == (target, stamp):
            return None  # refused before and unchanged since: the error stays on /readyz
        if not self._inside_root(target):
            self._refuse_model(target, f"{target}: lies outside the artifact root {self.root}")
            return None
        log.info("loading model version %s from %s", target.name, target)
        try:
            artifact = load_artifact(target, *parameter_limit(self.settings))
            store = store_for(artifact, current.model.store, self.settings)
            live = live_state(artifact, current.model.live, store, self.settings)
            return ServingModel(artifact, make_predictor(artifact, self.settings), store, live=live)
        except RankerError as e:
            self._refuse_model(target, str(e))
        except Exception as e:  # noqa: BLE001 - whatever breaks a load, the old model serves on
            log.exception("loading %s", target)
            self._refuse_model(target, f"{target}: cannot load: {type(e).__name__}: {e}")
        return None

    def _refuse_model(self, target: Path, error: str) -> None:
        self.model_error = f"artifact refused: {error}"
        self._failed_model = (target, artifact_stamp(target))
        log.error("%s; still serving model %s", self.model_error, self.state.model.version)


def _refreeze() -> None:
    """Moves the new model's objects into the collector's permanent generation, as start-up
    does for the first one (``gc.freeze`` in the lifespan): they live until the next reload
    and would otherwise be scanned by every full collection. The old state's objects go by
    reference counting once its last request finishes (the model graph holds no cycles)."""
    gc.collect()
    gc.freeze()


# --- The admin endpoint -------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="RANKER_ADMIN_TOKEN")


def require_admin(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """401 unless the bearer token is the configured one. The comparison is of the two tokens'
    SHA-256 digests with ``hmac.compare_digest``: constant time, whatever their lengths."""
    token = request.app.state.settings.admin_token
    given = credentials.credentials if credentials is not None else ""
    if token is None or not hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(),
        hashlib.sha256(token.get_secret_value().encode()).digest(),
    ):
        raise HTTPException(
            status_code=401,
            detail="admin token missing or wrong",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def _reload_request(request: Request) -> ReloadRequest:
    """The optional body, read only once the token has been checked (a dependency runs before
    the endpoint, but FastAPI parses declared bodies before dependencies): an unauthenticated
    client makes the service parse nothing and learns nothing from a 422."""
    raw = await request.body()
    if not raw.strip():
        return ReloadRequest()
    try:
        return ReloadRequest.model_validate_json(raw)
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


# Registered only when RANKER_ADMIN_TOKEN is set (``install_admin``): otherwise /admin/* does not
# exist, answers 404 like any unknown path, and is absent from the OpenAPI schema.
router = APIRouter(prefix="/admin", tags=["admin"])


@router.post(
    "/reload",
    response_model=ReloadResult,
    responses={
        401: {"model": Problem, "description": "admin token missing or wrong"},
        409: {"model": ReloadResult, "description": "something was refused; the old one serves"},
        422: {"model": ValidationProblem, "description": "a malformed body, or no such version"},
    },
    dependencies=[Depends(require_admin)],
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
        }
    },
)
async def reload_endpoint(request: Request) -> JSONResponse:
    """Loads the newest artifact version (or the named one, pinning it) and the ranking config
    now; 409 when either was refused, with what still serves."""
    body = await _reload_request(request)
    reloader: Reloader = request.app.state.reloader
    result = await reloader.reload(version=body.version)
    return JSONResponse(status_code=409 if result.error else 200, content=result.model_dump())


def install_admin(app: FastAPI, settings: Settings) -> None:
    """Adds the admin endpoints when an admin token is configured."""
    if settings.admin_token is not None:
        app.include_router(router)
