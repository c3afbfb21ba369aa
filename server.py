"""The HTTP layer: the only module that imports Bottle or speaks HTTP.

`make_app(settings, detector=...)` builds the Bottle app from parts handed in; `main()` reads flags and
environment, builds the parts and serves the app with waitress. Every error, Bottle's own 404/405 and
unexpected 500s included, leaves as `application/problem+json`; domain errors become HTTP statuses in
one table, `ERROR_STATUS`.
"""

from __future__ import annotations

import functools
import json
import logging
import signal
import sys
from http import HTTPStatus
from typing import Any

import bottle

import detect
import settings as settings_mod

__version__ = "0.1.0"

log = logging.getLogger(__name__)

# Domain errors -> HTTP status. The first matching class (in MRO order of the raised error) wins.
ERROR_STATUS: dict[type[BaseException], int] = {
    detect.TooManyPixels: 413,
    detect.NotAnImage: 422,  # UnsupportedFormat included
    detect.ModelError: 503,  # ModelMissing, ModelInvalid
}

PROBLEM_JSON = "application/problem+json"


class ClientError(Exception):
    """A mistake in the request that the HTTP layer itself finds (bad JSON, bad query...)."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status = status
        self.headers = headers or {}


def problem(status: int, detail: str, headers: dict[str, str] | None = None) -> bottle.HTTPResponse:
    """An RFC 9457 problem response; `detail` tells the user what was wrong and what to do."""
    body = {"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail}
    res = bottle.HTTPResponse(json.dumps(body), status=status, headers=headers)
    res.content_type = PROBLEM_JSON
    return res


def status_for(error: BaseException) -> int | None:
    for cls in type(error).__mro__:
        if cls in ERROR_STATUS:
            return ERROR_STATUS[cls]
    return None


def _json_errors(callback):
    """Route plugin: every exception a route raises becomes a problem response here, and only here."""

    @functools.wraps(callback)
    def wrapper(*args, **kwargs):
        try:
            return callback(*args, **kwargs)
        except bottle.HTTPResponse:
            raise
        except ClientError as e:
            return problem(e.status, str(e), e.headers)
        except Exception as e:
            status = status_for(e)
            if status is None:
                log.exception("unexpected error in %s %s", bottle.request.method, bottle.request.path)
                return problem(500, "The server failed to handle this request; the error is in its log. Try again later.")
            if status >= 500:
                log.warning("%s %s: %s", bottle.request.method, bottle.request.path, e)
            return problem(status, str(e))

    return wrapper


def _bottle_error(res: bottle.HTTPError) -> str:
    """Bottle's own errors (no route, wrong method, a failure outside a route) as problem+json."""
    status = res.status_code
    if status == 404:
        detail = f"There is no {bottle.request.path} here; GET /openapi.json lists the routes."
    elif status == 405:
        allowed = res.headers.get("Allow", "")
        detail = f"{bottle.request.method} is not allowed on {bottle.request.path}; use {allowed or 'another method'}."
    elif status == 413:
        detail = "The request body is too large; send a smaller image (see MAX_IMAGE_BYTES)."
    elif status >= 500:
        if res.traceback:
            log.error("unhandled error in %s %s\n%s", bottle.request.method, bottle.request.path, res.traceback)
        detail = "The server failed to handle this request; the error is in its log. Try again later."
    else:
        detail = str(res.body) or HTTPStatus(status).phrase
    bottle.response.content_type = PROBLEM_JSON
    return json.dumps({"type": "about:blank", "title": HTTPStatus(status).phrase, "status": status, "detail": detail})


def body_limit(settings: Any) -> int:
    """Largest request body we read: an image as base64 (4/3 of its bytes) plus room for the other fields."""
    return settings.max_image_bytes * 4 // 3 + 64 * 1024


def make_app(settings: Any, *, detector: detect.Detector) -> bottle.Bottle:
    """Build the WSGI app from its parts. Nothing here touches the network or starts a thread."""
    app = bottle.Bottle()
    app.config["imgsvc.settings"] = settings
    app.default_error_handler = _bottle_error
    app.install(_json_errors)
    # Bottle refuses bodies over MEMFILE_MAX (100 KB by default) for request.json and forms; a base64
    # photo is megabytes. This is a class attribute in Bottle, so it holds for the whole process.
    bottle.BaseRequest.MEMFILE_MAX = body_limit(settings)

    @app.get("/health")
    def health():
        info = detector.info()
        return {"status": "ok", "version": __version__, "detector": info}

    return app


# ---------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------


class _Stop(Exception):
    pass


def _raise_stop(signum, frame):
    raise _Stop(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    import waitress

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_mod.load(sys.argv[1:] if argv is None else argv)
    except settings_mod.SettingError as e:
        print(f"server.py: {e}", file=sys.stderr)
        return 2
    detector = detect.Detector(settings.model, threshold=settings.detect_threshold, threads=settings.detect_threads)
    if not detector.ready:
        log.warning("object detection is unavailable until a model is present: %s", detector.error)
    app = make_app(settings, detector=detector)
    server = waitress.create_server(
        app,
        host=settings.host,
        port=settings.port,
        threads=8,
        max_request_body_size=body_limit(settings),
        ident="imgsvc",
    )
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _raise_stop)
    log.info("listening on http://%s:%s (version %s)", settings.host, server.effective_port, __version__)
    try:
        server.run()
    except _Stop as e:
        log.info("stopping on %s", e)
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
