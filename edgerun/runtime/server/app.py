"""The Starlette app of `edge-run serve`: the JSON API under /v1 and the kiosk page at /.

    POST /v1/caption   image (+ prompt, decoding options)            -> {text, token_ids, score, alternatives}
    POST /v1/vqa       image, question (+ decoding options)          -> {text, token_ids, score, alternatives}
    POST /v1/search    text or image (+ k, exact)                    -> {results: [{rank, score, id, name, thumbnail}]}
    POST /v1/reload    load the bundles (and index) again, swap them in; a failure keeps the old ones
    GET  /v1/health    liveness and queue depth (no token needed)
    GET  /v1/models    the bundles, which task goes to which, the index, the limits

Requests are multipart/form-data (the image in the field `image`) or JSON (the image base64-encoded);
field names are the Python API's keyword names. Errors are JSON `{"error": message, "status": code}`.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import logging
import os
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict
from pathlib import Path

from ...errors import EdgeRunError, InputError, OptionError, require
from ..image import decode_image
from .config import ServerConfig
from .inputs import Fields, RequestError, parse_request
from .models import ENDPOINT_TASK, ModelSet, NoModel, default_loader, load_models
from .pool import Busy, JobTimeout, WorkerPool

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("edgerun.server")
_SECURITY_HEADERS = [
    (b"content-security-policy", (b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob:; "
                                  b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'")),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class ServerState:
    """What the handlers share: the current ModelSet (swapped whole on reload), the pool, the config."""

    def __init__(self, bundles: Sequence[str | os.PathLike], config: ServerConfig, index=None, loader=None):
        self.config = config
        self.paths = [os.path.abspath(b) for b in bundles]
        self.index_path = index
        self.loader = loader or default_loader(config.threads)
        self.models: ModelSet = load_models(self.paths, index=index, loader=self.loader)
        self.pool = WorkerPool(config.workers, config.queue_size)
        self._reload_lock = asyncio.Lock()
        self._tasks: set = set()

    async def reload(self) -> ModelSet:
        """Load everything again off the event loop, then swap it in. Requests in flight finish on the
        set they started with. Raises (and keeps serving the old set) when anything fails to load."""
        async with self._reload_lock:
            new = await asyncio.to_thread(load_models, self.paths, index=self.index_path, loader=self.loader,
                                          generation=self.models.generation + 1)
            self.models = new
            log.info("reloaded: generation %d serves %s", new.generation, ", ".join(sorted(new.routes)))
            return new

    def reload_in_background(self) -> None:
        """For SIGHUP: reload, and log a failure instead of raising it."""
        async def run():
            try:
                await self.reload()
            except EdgeRunError as exc:
                log.error("reload failed, still serving generation %d: %s", self.models.generation, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def create_app(bundles: Sequence[str | os.PathLike], config: ServerConfig | None = None, *, index=None,
               loader: Callable[[str], object] | None = None):
    """Load the bundles (raising BundleError, before anything listens, when one fails) and build the app.
    `loader(path) -> model` replaces `edgerun.load` (tests pass slow or failing stand-ins)."""
    require("starlette", "serve")
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.routing import Mount, Route
    from starlette.staticfiles import StaticFiles

    state = ServerState(bundles, config or ServerConfig(), index, loader)
    api = _Api(state)
    routes = [
        Route("/", api.page, methods=["GET"]),
        Route("/v1/health", api.health, methods=["GET"]),
        Route("/v1/models", api.guard(api.models), methods=["GET"]),
        Route("/v1/caption", api.guard(api.caption), methods=["POST"]),
        Route("/v1/vqa", api.guard(api.vqa), methods=["POST"]),
        Route("/v1/search", api.guard(api.search), methods=["POST"]),
        Route("/v1/reload", api.guard(api.reload), methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    handlers = {RequestError: _error, EdgeRunError: _error, Busy: _error, JobTimeout: _error,
                HTTPException: _error, Exception: _internal_error}
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=_lifespan(state))
    wrapped = _SecurityHeaders(app)
    wrapped.server = state  # for the CLI's log line and for tests
    return wrapped


def _lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app):
        loop = asyncio.get_running_loop()
        if state.config.handle_sighup:
            loop.add_signal_handler(signal.SIGHUP, state.reload_in_background)
        try:
            yield
        finally:
            if state.config.handle_sighup:
                loop.remove_signal_handler(signal.SIGHUP)
            state.pool.shutdown()

    return lifespan


class _SecurityHeaders:
    """Pure ASGI wrapper adding a strict CSP (the page loads nothing from elsewhere) and friends."""

    def __init__(self, app):
        self.app = app
        self.server: ServerState | None = None

    async def __call__(self, scope, receive, send):
        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = list(message["headers"]) + _SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers if scope["type"] == "http" else send)


class _Api:
    def __init__(self, state: ServerState):
        self.state = state

    def guard(self, handler):
        """Require `Authorization: Bearer TOKEN` where the server has a token."""
        token = self.state.config.token

        async def guarded(request):
            if token is not None:
                given = request.headers.get("authorization", "")
                scheme, _, value = given.partition(" ")
                if scheme.lower() != "bearer" or not hmac.compare_digest(value.strip().encode(), token.encode()):
                    raise RequestError(401, "this server needs a bearer token: send 'Authorization: Bearer TOKEN'")
            return await handler(request)

        return guarded

    async def page(self, request):
        from starlette.responses import FileResponse

        return FileResponse(STATIC / "index.html", headers={"cache-control": "no-cache"})

    async def health(self, request):
        models, pool = self.state.models, self.state.pool
        return _json({"status": "ok", "generation": models.generation, "tasks": sorted(models.routes),
                      "pending": pool.pending, "capacity": pool.capacity, "workers": pool.workers})

    async def models(self, request):
        c = self.state.config
        limits = {"max_upload_bytes": c.max_upload_bytes, "max_pixels": c.max_pixels, "max_k": c.max_k,
                  "max_num_beams": c.max_num_beams, "max_new_tokens": c.max_new_tokens, "timeout_s": c.timeout_s}
        return _json({**self.state.models.describe(), "limits": limits})

    async def caption(self, request):
        return await self._run(request, "caption", _caption_job)

    async def vqa(self, request):
        return await self._run(request, "vqa", _vqa_job)

    async def search(self, request):
        return await self._run(request, "search", _search_job)

    async def reload(self, request):
        old = self.state.models.generation
        try:
            new = await self.state.reload()
        except EdgeRunError as exc:
            raise RequestError(500, f"reload failed; still serving generation {old}: {exc}") from None
        return _json({"status": "reloaded", **new.describe()})

    async def _run(self, request, endpoint: str, job):
        start = time.perf_counter()
        models = self.state.models  # this request's set, whatever a reload does meanwhile
        loaded = models.for_task(ENDPOINT_TASK[endpoint])
        if endpoint == "search" and models.index is None:
            raise NoModel("search needs an index: start the server with --index INDEX")
        fields = await parse_request(request, endpoint, self.state.config)
        max_pixels = self.state.config.max_pixels
        body = await self.state.pool.run(lambda: job(loaded.model, models, fields, max_pixels),
                                         self.state.config.timeout_s)
        return _json({**body, "bundle": loaded.name, "generation": models.generation,
                      "ms": round((time.perf_counter() - start) * 1000, 1)})


# -- jobs: run in a worker thread ---------------------------------------------------------------------


def _decode(data: bytes, max_pixels: int):
    image = decode_image(data, name="upload")
    if image.shape[0] * image.shape[1] > max_pixels:  # a header that lied
        raise RequestError(413, f"the image decodes to {image.shape[1]}x{image.shape[0]} pixels; "
                                f"the limit is {max_pixels}")
    return image


def _texts(results) -> dict:
    results = results if isinstance(results, list) else [results]
    first, *rest = (asdict(r) for r in results)
    return {**first, "alternatives": rest}


def _caption_job(model, models: ModelSet, fields: Fields, max_pixels: int) -> dict:
    return _texts(model.caption(_decode(fields.image, max_pixels), **fields.values))


def _vqa_job(model, models: ModelSet, fields: Fields, max_pixels: int) -> dict:
    values = dict(fields.values)
    question = values.pop("question")
    return _texts(model.answer(_decode(fields.image, max_pixels), question, **values))


def _search_job(model, models: ModelSet, fields: Fields, max_pixels: int) -> dict:
    values, index = dict(fields.values), models.index
    text = values.pop("text", None)
    if (text is None) == (fields.image is None):
        raise RequestError(400, "give one query: the field 'text' or the field 'image', not both and not neither")
    k, exact = values.get("k", 8), values.get("exact", False)
    hits = (index.search_text(model, text, k, exact=exact) if fields.image is None
            else index.search_image(model, _decode(fields.image, max_pixels), k, exact=exact))
    return {"results": [{"rank": rank, "score": hit.score, "id": hit.id, "name": Path(hit.item).name,
                         "thumbnail": _data_url(index.thumbnail(hit.id) if index.has_thumbnails else None)}
                        for rank, hit in enumerate(hits, 1)]}


def _data_url(jpeg: bytes | None) -> str | None:
    return None if jpeg is None else "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


# -- errors -------------------------------------------------------------------------------------------


def _json(body: dict, status: int = 200, headers: dict | None = None):
    from starlette.responses import JSONResponse

    return JSONResponse(body, status_code=status, headers=headers)


def _status(exc: Exception) -> int:
    if isinstance(exc, RequestError):
        return exc.status
    if isinstance(exc, Busy):
        return 503
    if isinstance(exc, JobTimeout):
        return 504
    if isinstance(exc, NoModel):
        return 404
    if isinstance(exc, (InputError, OptionError)):
        return 400
    return getattr(exc, "status_code", 500)


async def _error(request, exc: Exception):
    status = _status(exc)
    headers = {"retry-after": str(exc.retry_after)} if isinstance(exc, Busy) else {}
    if status == 401:
        headers["www-authenticate"] = "Bearer"
    message = getattr(exc, "detail", None) or str(exc)
    if status >= 500 and status not in (503, 504):
        log.error("%s %s: %s", request.method, request.url.path, message)
    return _json({"error": message, "status": status}, status, headers)


async def _internal_error(request, exc: Exception):
    log.exception("%s %s failed", request.method, request.url.path, exc_info=exc)
    return _json({"error": f"internal error ({type(exc).__name__}); see the server log", "status": 500}, 500)
