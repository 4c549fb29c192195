"""`edge-run serve`: the JSON API and the offline kiosk page over one or more bundles."""
from __future__ import annotations

import click

from .errors import require


@click.command("serve")
@click.argument("bundles", nargs=-1, required=True, type=click.Path())
@click.option("--index", "index_path", type=click.Path(), help="index for /v1/search (edge-run index); "
              "needs the retrieval bundle that built it among BUNDLES")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on (0.0.0.0: every "
              "interface; give --token then)")
@click.option("--port", type=int, default=8080, show_default=True)
@click.option("--token", envvar="EDGERUN_SERVE_TOKEN", help="require 'Authorization: Bearer TOKEN' on /v1/* "
              "(also read from EDGERUN_SERVE_TOKEN, which keeps it out of the process list)")
@click.option("--workers", type=int, default=1, show_default=True, help="requests run at once")
@click.option("--queue", "queue_size", type=int, default=8, show_default=True,
              help="requests that may wait for a worker; beyond them: 503 with Retry-After")
@click.option("--timeout", "timeout_s", type=float, default=30.0, show_default=True,
              help="seconds per request, waiting included; beyond them: 504")
@click.option("--max-upload-mb", type=float, default=10.0, show_default=True, help="request body limit (413)")
@click.option("--max-pixels", type=int, default=40_000_000, show_default=True,
              help="image size limit, width x height read before decoding (413)")
@click.option("--threads", type=int, help="onnxruntime threads per session (default: all cores)")
def serve(bundles, index_path, host, port, token, workers, queue_size, timeout_s, max_upload_mb, max_pixels,
          threads):
    """Serve BUNDLES (e.g. a caption, a VQA and a retrieval bundle): POST /v1/caption, /v1/vqa,
    /v1/search, /v1/reload; GET /v1/health, /v1/models; the kiosk page at /.

    SIGHUP or POST /v1/reload loads the bundles again from the same paths and swaps them in; a
    bundle that fails to load leaves the old ones serving.
    """
    import logging

    from .runtime.server.app import create_app
    from .runtime.server.config import ServerConfig

    uvicorn = require("uvicorn", "serve")
    config = ServerConfig(workers=workers, queue_size=queue_size, timeout_s=timeout_s,
                          max_upload_bytes=int(max_upload_mb * 2**20), max_pixels=max_pixels, threads=threads,
                          token=token or None, handle_sighup=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    app = create_app(bundles, config, index=index_path)  # loads everything, or stops here with the reason
    routes = app.server.models.describe()["routes"]
    click.echo(f"serving {', '.join(f'{t} ({b})' for t, b in routes.items())} on http://{host}:{port}/", err=True)
    if host not in ("127.0.0.1", "localhost", "::1") and token is None:
        click.echo(f"warning: listening on {host} without --token: anyone who can reach it can use it", err=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=int(timeout_s) + 5)
