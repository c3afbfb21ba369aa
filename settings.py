"""Every setting of the service, declared once.

Each `Setting` has its environment variable, optional command-line flag, default and help line; the
README table and `python server.py --help` are both made from `SETTINGS`, and a test keeps README true.
Flags win over the environment, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, make_dataclass
from typing import Any, Callable


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


def _str(text: str) -> str:
    return text


@dataclass(frozen=True)
class Setting:
    name: str  # attribute on Settings
    env: str
    default: Any
    help: str
    flag: str | None = None
    parse: Callable[[str], Any] = _str
    default_doc: str | None = None  # how README shows a computed default
    secret: bool = False  # never logged or shown


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


SETTINGS: tuple[Setting, ...] = (
    Setting("host", "HOST", "127.0.0.1", "Address to listen on; 0.0.0.0 to serve the LAN.", flag="--host"),
    Setting("port", "PORT", 8080, "TCP port to listen on.", flag="--port", parse=_port),
    Setting("db", "IMAGES_DB", "data/images.db", "SQLite file holding images, bytes and detections.", flag="--db"),
    Setting(
        "model",
        "DETECT_MODEL",
        "models/efficientdet_lite0.tflite",
        "TFLite detection model (a path). `make model` fetches the default.",
        flag="--model",
    ),
    Setting(
        "detect_threshold",
        "DETECT_THRESHOLD",
        0.5,
        "Lowest confidence a detection needs to be reported (0..1].",
        parse=_fraction,
    ),
    Setting(
        "detect_threads",
        "DETECT_THREADS",
        _cpu_count,
        "CPU threads for inference; also how many detections run at once.",
        parse=_positive_int,
        default_doc="number of CPU cores",
    ),
    Setting("imgur_client_id", "IMGUR_CLIENT_ID", "", "Imgur application client id; uploads are off while unset.", secret=True),
    Setting(
        "imgur_client_secret",
        "IMGUR_CLIENT_SECRET",
        "",
        "Imgur client secret; with IMGUR_REFRESH_TOKEN, uploads go to that account.",
        secret=True,
    ),
    Setting("imgur_refresh_token", "IMGUR_REFRESH_TOKEN", "", "Imgur OAuth refresh token of the account.", secret=True),
    Setting("imgur_api_url", "IMGUR_API_URL", "https://api.imgur.com", "Base URL of the Imgur API."),
    Setting(
        "allow_private_urls",
        "ALLOW_PRIVATE_URLS",
        False,
        "Let URL downloads reach loopback/LAN addresses (tests, trusted LANs). Size and time limits stay.",
        flag="--allow-private-urls",
        parse=_bool,
    ),
    Setting(
        "max_image_bytes",
        "MAX_IMAGE_BYTES",
        20 * 1024 * 1024,
        "Largest image accepted, uploaded or downloaded, in bytes.",
        parse=_positive_int,
    ),
    Setting("upload_workers", "UPLOAD_WORKERS", 4, "Threads uploading to Imgur; 0 runs uploads inline (tests).", parse=_non_negative_int),
    Setting("job_max_urls", "JOB_MAX_URLS", 1000, "Most URLs one upload job may hold (after duplicates are removed).", parse=_positive_int),
    Setting(
        "upload_backlog",
        "UPLOAD_BACKLOG",
        5000,
        "Most URLs waiting or under way across all jobs; past it, new jobs get 503 with Retry-After.",
        parse=_positive_int,
    ),
    Setting("jobs_kept", "JOBS_KEPT", 1000, "Finished jobs remembered; older ones are forgotten first.", parse=_positive_int),
)

_BY_NAME = {s.name: s for s in SETTINGS}


def _settings_public(self) -> dict[str, Any]:
    """The settings safe to show or log (secrets reduced to whether they are set)."""
    return {s.name: bool(v) if s.secret else v for s in SETTINGS for v in [getattr(self, s.name)]}


# The one place defaults live is SETTINGS; the dataclass is made from it. A callable default is computed
# when the Settings is made (the CPU count of the machine it runs on).
Settings = make_dataclass(
    "Settings",
    [
        (s.name, Any, field(default_factory=s.default) if callable(s.default) else field(default=s.default, repr=not s.secret))
        for s in SETTINGS
    ],
    frozen=True,
    namespace={"public": _settings_public, "__doc__": "Resolved settings; attribute names are SETTINGS' names."},
)


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


def load(argv: list[str] | None = None, environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
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
