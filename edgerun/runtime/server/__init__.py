"""`edge-run serve`: a JSON API and an offline kiosk page over loaded bundles (the `serve` extra).

    config.py   ServerConfig: limits, workers, queue, timeouts, token
    models.py   the loaded bundles (and index), routed by the tasks their manifests list; reload
    pool.py     the bounded worker pool: full queue -> Busy (503), slow job -> JobTimeout (504)
    inputs.py   request parsing: size limit, multipart or JSON, fields, image header and pixel limit
    app.py      the Starlette app: routes, bearer token, errors as JSON
    static/     the kiosk page (no external resources)

Nothing here imports torch; starlette and uvicorn are imported by app.py and the CLI only.
"""
