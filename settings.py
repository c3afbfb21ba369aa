"""Every setting of the service, declared once.

`Settings` is a frozen dataclass: each field carries its environment variable, optional command-line
flag, default and help line, so a type checker sees every setting. `SETTINGS`, the list that
`python server.py --help` and README's table (`markdown_table()`, held to README by a test) come from,
is derived from it.
Flags win over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Mapping


class SettingError(ValueError):
    """A setting's value cannot be used; the message names the setting and what it accepts."""


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"", "0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected 1/0, true/false, yes/no or on/off, got {text!r}")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"expected a whole number >= 1, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"expected a whole number >= 0, got {text!r}")
    return value


def _page_size(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 1000:
        raise ValueError(f"expected a whole number 0..1000 (GET /images answers at most 1,000 a page), got {text!r}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port 0..65535, got {text!r}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise ValueError(f"expected a number in (0, 1], got {text!r}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:  # also refuses nan
        raise ValueError(f"expected a number > 0, got {text!r}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise ValueError(f"expected a number >= 0, got {text!r}")
    return value


def _str(text: str) -> str:
    return text


def _host_names(text: str) -> tuple[str, ...]:
    names = tuple(n.strip().lower().rstrip(".") for n in text.split(",") if n.strip())
    for name in names:
        if name != "*" and not re.fullmatch(r"\.?[a-z0-9_-]+(\.[a-z0-9_-]+)*", name):
            raise ValueError(f"expected host names without ports, such as pi4.lan or .example.com, or *; got {name!r}")
    return names


def _origins(text: str) -> tuple[str, ...]:
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if not re.fullmatch(r"(?i)https?://[^/?#\s@]+", origin):
            raise ValueError(
                f"expected origins such as https://dash.lan:3000 (scheme, host and port; no path and no *), got {origin!r}"
            )
    return origins


def _address(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text.strip())) if text.strip() else ""
    except ValueError:
        raise ValueError(f"expected the IP address of the proxy, such as 127.0.0.1, got {text!r}") from None


@dataclass(frozen=True)
class Setting:
    """How one field of `Settings` is read: its environment variable, flag, parser and help line."""

    name: str  # the attribute on Settings
    env: str
    default: Any  # a value, or a callable computed when Settings is made
    help: str
    flag: str | None = None
    parse: Callable[[str], Any] = _str
    default_doc: str | None = None  # how README shows a computed default
    secret: bool = False  # never logged or shown


def _setting(env: str, default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field of Settings that carries its Setting (the name is filled in from the field)."""
    meta = {"setting": dict(env=env, default=default, help=help, **spec)}
    if callable(default):
        return field(default_factory=default, metadata=meta)
    return field(default=default, metadata=meta, repr=not spec.get("secret", False))


@dataclass(frozen=True)
class Settings:
    """Every setting of the service: the one declaration. README's table and --help are made from it."""

    host: str = _setting("HOST", "127.0.0.1", "Address to listen on; 0.0.0.0 to serve the LAN.", flag="--host")
    port: int = _setting("PORT", 8080, "TCP port to listen on (0 picks a free one and logs it).", flag="--port", parse=_port)
    db: str = _setting(
        "IMAGES_DB", "data/images.db",
        "Where images, bytes and detections live: a SQLite file (created with its folder), or a PostgreSQL URL "
        "postgresql://user:pass@host:port/dbname (needs requirements-postgres.txt).",
        flag="--db",
    )
    model: str = _setting(
        "DETECT_MODEL", "models/efficientdet_lite0.tflite",
        "TFLite detection model (a path). `make model` fetches the default.", flag="--model",
    )
    detect_threshold: float = _setting(
        "DETECT_THRESHOLD", 0.5, "Lowest confidence a detection needs to be reported (0..1].", parse=_fraction
    )
    detect_threads: int = _setting(
        "DETECT_THREADS", 0, "CPU threads of each detection interpreter; 0: min(cores, 4).",
        parse=_non_negative_int, default_doc="0 (min(cores, 4))",
    )
    detect_interpreters: int = _setting(
        "DETECT_INTERPRETERS", 0,
        "Detections that run at once, each on its own interpreter; 0: 2 x cores / DETECT_THREADS, at most 8.",
        parse=_non_negative_int, default_doc="0 (2 x cores / DETECT_THREADS, at most 8)",
    )
    max_pixels: int = _setting(
        "MAX_PIXELS", 50_000_000,
        "Largest image accepted, in pixels, checked from its header before decoding (413 beyond).",
        parse=_positive_int,
    )
    decode_memory_mb: int = _setting(
        "DECODE_MEMORY_MB", 256,
        "Memory all image decodes together may use, in MB, estimated from each header; an image that "
        "alone needs more is refused (413).",
        parse=_positive_int,
    )
    decode_wait_ms: int = _setting(
        "DECODE_WAIT_MS", 2000,
        "Milliseconds a decode waits for room in DECODE_MEMORY_MB; past it, 503 with Retry-After.",
        parse=_non_negative_int,
    )
    imgur_client_id: str = _setting(
        "IMGUR_CLIENT_ID", "", "Imgur application client id; uploads are off while unset.", secret=True
    )
    imgur_client_secret: str = _setting(
        "IMGUR_CLIENT_SECRET", "", "Imgur client secret; with IMGUR_REFRESH_TOKEN, uploads go to that account.",
        secret=True,
    )
    imgur_refresh_token: str = _setting("IMGUR_REFRESH_TOKEN", "", "Imgur OAuth refresh token of the account.", secret=True)
    imgur_api_url: str = _setting("IMGUR_API_URL", "https://api.imgur.com", "Base URL of the Imgur API.")
    imgur_timeout: float = _setting(
        "IMGUR_TIMEOUT", 60, "Seconds one upload attempt to Imgur may take at least (connect, send, the answer).",
        parse=_positive_float,
    )
    imgur_min_upload_rate: int = _setting(
        "IMGUR_MIN_UPLOAD_RATE", 128 * 1024,
        "Bytes per second an upload must reach: a big image's attempt may take size / this rate.",
        parse=_positive_int,
    )
    imgur_max_answer_bytes: int = _setting(
        "IMGUR_MAX_ANSWER_BYTES", 1024 * 1024, "Most bytes read of one answer from Imgur (its answers are about 1 KB).",
        parse=_positive_int,
    )
    allow_private_urls: bool = _setting(
        "ALLOW_PRIVATE_URLS", False,
        "Let URL downloads reach loopback/LAN addresses (tests, trusted LANs). Size and time limits stay.",
        flag="--allow-private-urls", parse=_bool,
    )
    api_key: str = _setting(
        "API_KEY", "",
        "Key every request needs (Authorization: Bearer or X-API-Key) but the page, /health and POST /session; "
        "unset: the API is open.", secret=True,
    )
    api_key_file: str = _setting("API_KEY_FILE", "", "A file holding API_KEY (Docker secrets); instead of API_KEY.")
    session_hours: float = _setting(
        "SESSION_HOURS", 24, "Hours a sign-in on the page (POST /session) lasts.", parse=_positive_float
    )
    auth_failures: int = _setting(
        "AUTH_FAILURES", 10, "Wrong keys one client may send in a minute; then it gets 429 for a minute.",
        parse=_positive_int,
    )
    allowed_hosts: tuple[str, ...] = _setting(
        "ALLOWED_HOSTS", (),
        "Names browsers may use for this service besides IP addresses, localhost and this machine's name "
        "(comma-separated; .example.com for a domain, * for any).", parse=_host_names, default_doc="none",
    )
    allowed_origins: tuple[str, ...] = _setting(
        "ALLOWED_ORIGINS", (),
        "Web origins of other pages that may call the API (CORS and writes), e.g. https://dash.lan:3000 (comma-separated).",
        parse=_origins, default_doc="none",
    )
    trusted_proxy: str = _setting(
        "TRUSTED_PROXY", "", "Address of a reverse proxy whose X-Forwarded-Proto/-Host/-For are believed.", parse=_address
    )
    max_image_bytes: int = _setting(
        "MAX_IMAGE_BYTES", 20 * 1024 * 1024, "Largest image accepted, uploaded or downloaded, in bytes.",
        parse=_positive_int,
    )
    fetch_timeout: float = _setting(
        "FETCH_TIMEOUT", 10, "Seconds one URL download may take in all (connect, redirects, body).",
        parse=_positive_float,
    )
    upload_workers: int = _setting(
        "UPLOAD_WORKERS", 4, "Threads uploading to Imgur; 0 runs uploads inline (tests).", parse=_non_negative_int
    )
    job_max_urls: int = _setting(
        "JOB_MAX_URLS", 1000, "Most URLs one upload job may hold (after duplicates are removed).", parse=_positive_int
    )
    upload_backlog: int = _setting(
        "UPLOAD_BACKLOG", 5000,
        "Most URLs waiting or under way across all jobs; past it, new jobs get 503 with Retry-After.",
        parse=_positive_int,
    )
    jobs_kept: int = _setting(
        "JOBS_KEPT", 1000, "Finished jobs remembered; older ones are forgotten first.", parse=_positive_int
    )
    jobs_kept_mb: float = _setting(
        "JOBS_KEPT_MB", 32,
        "Megabytes the remembered finished jobs may hold in all (URLs, links, reasons); older ones are forgotten first.",
        parse=_positive_float,
    )
    waitress_threads: int = _setting(
        "WAITRESS_THREADS", 0,
        "Threads answering HTTP requests; reads go first, one thread is kept for them. 0: DOWNLOAD_SLOTS + "
        "DETECT_INTERPRETERS + DETECT_QUEUE + 4; fewer than that + 2 is refused at start.",
        parse=_non_negative_int,
    )
    connection_limit: int = _setting(
        "CONNECTION_LIMIT", 1000, "Most client connections open at once; waitress stops accepting beyond it.",
        parse=_positive_int,
    )
    channel_timeout: int = _setting(
        "CHANNEL_TIMEOUT", 60, "Seconds a client connection may stay silent before it is closed.", parse=_positive_int
    )
    body_buffer_mb: int = _setting(
        "BODY_BUFFER_MB", 96,
        "Megabytes of request bodies held at once across connections, in memory or temporary files (503 beyond).",
        parse=_positive_int,
    )
    header_timeout: float = _setting(
        "HEADER_TIMEOUT", 20, "Seconds a client has to send a request's headers (408 beyond).", parse=_positive_float
    )
    body_timeout: float = _setting(
        "BODY_TIMEOUT", 20,
        "Seconds a client has to send a request's body, extended by one second per MIN_RATE_BPS bytes received.",
        parse=_positive_float,
    )
    min_rate_bps: int = _setting(
        "MIN_RATE_BPS", 500, "Bytes per second a request body must arrive at, on average, past BODY_TIMEOUT.",
        parse=_positive_int,
    )
    min_free_disk_mb: int = _setting(
        "MIN_FREE_DISK_MB", 256,
        "Megabytes kept free on the database's filesystem: writes that would go below answer 507 (reads work).",
        parse=_non_negative_int,
    )
    db_pool_size: int = _setting(
        "DB_POOL_SIZE", 0,
        "Database connections this process keeps open at most; 0: 64 for SQLite, 16 for PostgreSQL (every process "
        "counts against the server's max_connections, 100 by default). A request that finds none free waits DB_BUSY_TIMEOUT, then 503.",
        parse=_non_negative_int,
    )
    db_busy_timeout: float = _setting(
        "DB_BUSY_TIMEOUT", 10,
        "Seconds a write waits for the database (SQLite's write lock, a PostgreSQL row lock, a free connection) before 503 with Retry-After.",
        parse=_positive_float,
    )
    stop_grace: float = _setting(
        "STOP_GRACE", 8,
        "Seconds SIGTERM waits for requests in flight before stopping; the upload jobs get 2 s more.",
        parse=_non_negative_float,
    )
    download_slots: int = _setting(
        "DOWNLOAD_SLOTS", 2, "URL downloads of POST /images at once; beyond them (after ADMISSION_WAIT_MS) 503.",
        parse=_positive_int,
    )
    detect_queue: int = _setting(
        "DETECT_QUEUE", 4,
        "Detections that may wait for a busy detector (DETECT_INTERPRETERS run); beyond them (after ADMISSION_WAIT_MS) 503.",
        parse=_non_negative_int,
    )
    admission_wait_ms: int = _setting(
        "ADMISSION_WAIT_MS", 500,
        "Milliseconds a request waits for a download slot or a detection place before 503 with Retry-After.",
        parse=_non_negative_int,
    )
    vision_models_dir: str = _setting(
        "VISION_MODELS_DIR", "models",
        "Folder of the models `/v1/vision/custom/{name}` serves: each .tflite file there, named by its file name without .tflite.",
    )
    vision_models_loaded: int = _setting(
        "VISION_MODELS_LOADED", 2,
        "Custom models kept loaded at once (besides DETECT_MODEL); the least recently used is unloaded first.",
        parse=_positive_int,
    )
    vision_max_predictions: int = _setting(
        "VISION_MAX_PREDICTIONS", 20,
        "Most predictions one /v1/vision/ answer holds, highest confidence first (Frigate reads at most 20).",
        parse=_positive_int,
    )
    vision_store: bool = _setting(
        "VISION_STORE", False,
        "Store each image /v1/vision/ analyses, as POST /images with detection would (searchable by its objects).",
        parse=_bool,
    )
    thumbnail_read_ahead: int = _setting(
        "THUMBNAIL_READ_AHEAD", 24,
        "Images of each GET /images page whose 320 px WebP thumbnail is made ahead, in the background; 0 for off, at most 1000.",
        parse=_page_size,
    )
    vision_store_max: int = _setting(
        "VISION_STORE_MAX", 10000,
        "Most images VISION_STORE keeps; past it the oldest stored that way are deleted.",
        parse=_positive_int,
    )

    def public(self) -> dict[str, Any]:
        """The settings safe to show or log (secrets reduced to whether they are set)."""
        return {s.name: bool(v) if s.secret else v for s in SETTINGS for v in [getattr(self, s.name)]}


SETTINGS: tuple[Setting, ...] = tuple(Setting(name=f.name, **f.metadata["setting"]) for f in fields(Settings))
_BY_NAME = {s.name: s for s in SETTINGS}


def markdown_table() -> str:
    """README's settings table, made from SETTINGS (a test holds README to it exactly)."""
    rows = ["| variable | flag | default | meaning |", "|---|---|---|---|"]
    for s in SETTINGS:
        rows.append(f"| `{s.env}` | {f'`{s.flag}`' if s.flag else ''} | {default_text(s)} | {s.help} |")
    return "\n".join(rows)


def _parse(setting: Setting, text: str) -> Any:
    try:
        return setting.parse(text)
    except ValueError as e:
        where = f"{setting.flag} / {setting.env}" if setting.flag else setting.env
        raise SettingError(f"{where}: {e}") from None


def argument_parser(prog: str = "server.py", description: str | None = None) -> argparse.ArgumentParser:
    """A parser whose --help lists every setting with its environment variable and default."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Settings read from the environment (flags win):\n"
        + "\n".join(f"  {s.env:<22} {s.help} (default: {default_text(s)})" for s in SETTINGS),
    )
    for s in SETTINGS:
        if s.flag is None:
            continue
        if s.parse is _bool:
            parser.add_argument(s.flag, dest=s.name, action="store_true", default=None, help=f"{s.help} [{s.env}=1]")
        else:
            parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.env, help=f"{s.help} [{s.env}, default: {default_text(s)}]")
    return parser


def default_text(s: Setting) -> str:
    if s.default_doc:
        return s.default_doc
    if s.parse is _bool:
        return "off"
    if s.default == "":
        return "unset"
    return str(s.default)


def load(argv: list[str] | None = None, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
    """Settings from flags (`argv`), then `environ`, then defaults; `overrides` win over all (tests)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for s in SETTINGS:
        raw = environ.get(s.env)
        if raw is not None and (raw.strip() or s.default == ""):
            values[s.name] = _parse(s, raw.strip())
    if argv is not None:
        args = argument_parser().parse_args(argv)
        for s in SETTINGS:
            given = getattr(args, s.name, None) if s.flag else None
            if given is not None:
                values[s.name] = given if isinstance(given, bool) else _parse(s, given)
    values.update(overrides)
    unknown = set(values) - set(_BY_NAME)
    if unknown:
        raise SettingError(f"unknown setting(s): {', '.join(sorted(unknown))}")
    return Settings(**values)


if __name__ == "__main__":
    import sys

    if sys.argv[1:] == ["--markdown"]:
        print(markdown_table())  # command-line output: README's settings table
    else:
        print("usage: python settings.py --markdown   (prints README's settings table)", file=sys.stderr)
        sys.exit(2)
