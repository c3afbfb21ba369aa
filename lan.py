"""Safe on a LAN: the checks every request passes before a route runs, in plain WSGI terms.

A `Guard` looks at a request's WSGI environ and answers, in this order:
1. 421 Misdirected Request when a browser names this service by a host that is not its own (DNS rebinding);
2. 403 Forbidden for a write sent by a page of another origin (a cross-site form post or fetch);
3. 401 Unauthorized (429 Too Many Requests after repeated wrong keys) when API_KEY is set and the request
   carries neither the key nor a valid session cookie.
Origins listed in ALLOWED_ORIGINS also get CORS answers. The page signs in with `POST /session`, which
sets a cookie holding a signed token with its expiry: no server-side state, and a new key ends every
session. This module never imports Bottle; server.py turns an `Answer` into an HTTP response.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import hmac
import ipaddress
import logging
import math
import secrets
import socket
import threading
import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Callable, Mapping

log = logging.getLogger(__name__)

SESSION_COOKIE = "imgsvc_session"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# The policy the page has always had: it loads nothing from elsewhere, so it works on a Pi without internet.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)
HTML_HEADERS = (
    ("Content-Security-Policy", CONTENT_SECURITY_POLICY),
    ("X-Frame-Options", "DENY"),  # frame-ancestors for browsers that predate it
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
)
CORS_EXPOSED = "Location, Link, Retry-After, ETag, WWW-Authenticate"
CORS_ALLOWED_HEADERS = "Authorization, X-API-Key, Content-Type"
CORS_METHODS = "GET, HEAD, POST, DELETE"
FAILURE_WINDOW = 60.0  # seconds: "N wrong keys in a minute", and how long the client then waits
TRACKED_CLIENTS = 1024  # clients whose recent wrong keys are remembered (at most about 600 bytes each); oldest forgotten first
LOG_LINES_PER_WINDOW = 10  # wrong-key log lines per minute, all clients together; the rest are counted
MIN_KEY_LENGTH = 8
MAX_KEY_FILE_BYTES = 4096
MAX_TOKEN_LENGTH = 200
PROXY_HEADERS = "x-forwarded-proto x-forwarded-host x-forwarded-for"
_TOKEN_CONTEXT = b"imgsvc session"


class KeyUnusable(ValueError):
    """API_KEY / API_KEY_FILE cannot be used; the message names the setting and what to do."""


def read_key(api_key: str, api_key_file: str) -> str:
    """The API key from API_KEY or the file API_KEY_FILE names (Docker secrets); "" when neither is set."""
    if api_key and api_key_file:
        raise KeyUnusable("set one of API_KEY and API_KEY_FILE, not both")
    where = "API_KEY"
    if api_key_file:
        where = f"API_KEY_FILE ({api_key_file})"
        try:
            with open(api_key_file, "rb") as f:
                raw = f.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise KeyUnusable(f"cannot read {where}: {e.strerror or e}; point API_KEY_FILE at a readable file") from None
        if len(raw) > MAX_KEY_FILE_BYTES:
            raise KeyUnusable(f"{where} is larger than {MAX_KEY_FILE_BYTES} bytes; it must hold the key alone")
        try:
            api_key = raw.decode("ascii").strip()
        except UnicodeDecodeError:
            api_key = "\x00"  # refused below, with the same words
        if not api_key:
            raise KeyUnusable(f"{where} is empty; write the key into it")
    if not api_key:
        return ""
    if not all(33 <= ord(c) <= 126 for c in api_key):
        raise KeyUnusable(f"{where} must be printable ASCII without spaces (it travels in an HTTP header)")
    if len(api_key) < MIN_KEY_LENGTH:
        raise KeyUnusable(
            f"{where} is {len(api_key)} characters; use at least {MIN_KEY_LENGTH}, better a random one: "
            "python3 -c 'import secrets; print(secrets.token_urlsafe(24))'"
        )
    return api_key


def proxy_options(trusted_proxy: str) -> dict[str, Any]:
    """waitress.create_server's options for TRUSTED_PROXY: believe X-Forwarded-Proto/-Host/-For from that
    address only (waitress drops those headers from everyone else)."""
    if not trusted_proxy:
        return {}
    return {"trusted_proxy": trusted_proxy, "trusted_proxy_headers": PROXY_HEADERS}


def is_loopback(host: str) -> bool:
    """Whether HOST listens on loopback only (127.0.0.1, ::1, localhost)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class Answer:
    """What the guard says instead of the route (a refusal, a CORS preflight) or a session route's answer.
    An empty `detail` means an answer without a body."""

    status: int
    detail: str = ""
    headers: tuple[tuple[str, str], ...] = ()


# ---------------------------------------------------------------------------------------------------------
# Hosts and origins
# ---------------------------------------------------------------------------------------------------------


def _split_host(value: str) -> tuple[str, int | None] | None:
    """A Host header (or an origin's netloc) as (lower-case name without a trailing dot, port or None)."""
    value = value.strip().lower()
    if not value or any(c in value for c in "/\\@ \t"):
        return None
    port: int | None = None
    if value.startswith("["):
        end = value.find("]")
        if end < 0:
            return None
        name, rest = value[1:end], value[end + 1:]
        if rest:
            if not rest.startswith(":"):
                return None
            port_text = rest[1:]
        else:
            port_text = None
    elif value.count(":") == 1:
        name, port_text = value.split(":")
    elif ":" in value:
        return None  # an IPv6 literal must be bracketed
    else:
        name, port_text = value, None
    if port_text is not None:
        if not port_text.isdigit() or len(port_text) > 5:
            return None
        port = int(port_text)
    name = name.rstrip(".")
    return (name, port) if name else None


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


def normal_origin(origin: str) -> str | None:
    """An origin as scheme://host[:port], lower case, without its scheme's default port; None if it is none
    (`null`, a path, another scheme)."""
    parts = urllib.parse.urlsplit(origin.strip())
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query or parts.fragment:
        return None
    split = _split_host(parts.netloc)
    if split is None:
        return None
    name, port = split
    shown = f"[{name}]" if ":" in name else name
    if port is None or port == _default_port(parts.scheme):
        return f"{parts.scheme}://{shown}"
    return f"{parts.scheme}://{shown}:{port}"


def _host_of(environ: Mapping[str, Any]) -> str:
    if "HTTP_HOST" in environ:  # present but empty is no name of ours
        return environ["HTTP_HOST"]
    return f"{environ.get('SERVER_NAME', '')}:{environ.get('SERVER_PORT', '')}"


def _same_origin(origin: str, host_header: str) -> bool:
    """Whether `origin` names this service: its host and port are the Host header's. The scheme may differ
    (a TLS proxy in front); a Host without a port has the origin's scheme's default one."""
    normal = normal_origin(origin)
    host = _split_host(host_header)
    if normal is None or host is None:
        return False
    scheme, netloc = normal.split("://", 1)
    split = _split_host(netloc)
    if split is None:
        return False
    name, port = split
    return (name, port or _default_port(scheme)) == (host[0], host[1] or _default_port(scheme))


def _from_browser(environ: Mapping[str, Any]) -> bool:
    """Whether a request comes from a web browser, which is where DNS rebinding runs.

    Origin, Sec-Fetch-* and our cookie are what the issue names. Chromium sends neither Origin nor
    Sec-Fetch-* on a same-origin GET from a plain-http page (Sec-Fetch-* goes only to https and localhost),
    so a rebinding page's reads would pass on those alone; every browser also sends a Mozilla/ User-Agent
    (which page scripts cannot change in Chromium) and Accept-Language (which they cannot remove).
    curl, python-requests, aiohttp (Home Assistant) and Frigate send neither.
    """
    if "HTTP_ORIGIN" in environ or "HTTP_REFERER" in environ or "HTTP_ACCEPT_LANGUAGE" in environ:
        return True
    if any(k.startswith("HTTP_SEC_FETCH_") for k in environ):
        return True
    if environ.get("HTTP_USER_AGENT", "").startswith("Mozilla/"):
        return True
    return _cookie(environ) is not None


def _cookie(environ: Mapping[str, Any]) -> str | None:
    for part in environ.get("HTTP_COOKIE", "").split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == SESSION_COOKIE:
            return value.strip().strip('"')
    return None


def _presented_key(environ: Mapping[str, Any]) -> str | None:
    """The key sent as `Authorization: Bearer <key>` or `X-API-Key: <key>`; None when neither is sent."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    scheme, _, value = auth.strip().partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    key = environ.get("HTTP_X_API_KEY")
    if key is not None and key.strip():
        return key.strip()
    return None


def sends_credentials(environ: Mapping[str, Any]) -> bool:
    """Whether a request carries a key header or a session cookie (right or wrong)."""
    return _presented_key(environ) is not None or _cookie(environ) is not None


def client_of(environ: Mapping[str, Any]) -> str:
    """Whom wrong keys are counted against: the peer address (the real client's behind TRUSTED_PROXY);
    an IPv6 client by its /64, since one host may hold all of those addresses."""
    addr = environ.get("REMOTE_ADDR") or "unknown"
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return addr[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


def _shown(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


# ---------------------------------------------------------------------------------------------------------
# Wrong keys: counted per client, in bounded memory
# ---------------------------------------------------------------------------------------------------------


class _Client:
    __slots__ = ("failures", "blocked_until")

    def __init__(self):
        self.failures: list[float] = []  # times of the wrong keys within the window, oldest first (a list: a
        self.blocked_until = 0.0  # deque would cost 600 bytes however few it holds)


class FailureLimiter:
    """Wrong keys per client: after `limit` within FAILURE_WINDOW seconds, the client waits that long.

    At most `capacity` clients are remembered, the least recently failing forgotten first, so a flood
    of addresses costs bounded memory. Thread-safe.
    """

    def __init__(self, limit: int, capacity: int = TRACKED_CLIENTS, now: Callable[[], float] = time.monotonic):
        self.limit, self.capacity, self.now = limit, capacity, now
        self._clients: collections.OrderedDict[str, _Client] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def wait(self, client: str) -> int:
        """Seconds the client must still wait (0: it may try)."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return 0
            left = entry.blocked_until - self.now()
            return math.ceil(left) if left > 0 else 0

    def fail(self, client: str) -> tuple[int, bool]:
        """Count one wrong key: (wrong keys in the window, whether the client is now made to wait)."""
        with self._lock:
            t = self.now()
            entry = self._clients.pop(client, None)
            if entry is None:
                entry = _Client()
                while len(self._clients) >= self.capacity:
                    self._clients.popitem(last=False)
            self._clients[client] = entry  # most recent last
            recent = [f for f in entry.failures if f > t - FAILURE_WINDOW]
            entry.failures = recent[max(0, len(recent) - self.limit + 1):] + [t]
            count = len(entry.failures)
            if count >= self.limit:
                entry.blocked_until = t + FAILURE_WINDOW
                entry.failures.clear()
                return count, True
            return count, False


class _LogBudget:
    """At most `lines` log lines per FAILURE_WINDOW; the ones held back are counted into the next."""

    def __init__(self, lines: int, now: Callable[[], float]):
        self.lines, self.now = lines, now
        self._start, self._used, self._held = -math.inf, 0, 0
        self._lock = threading.Lock()

    def take(self) -> int | None:
        """None: do not log; else the number of lines held back since the last one logged."""
        with self._lock:
            t = self.now()
            if t - self._start >= FAILURE_WINDOW:
                self._start, self._used = t, 0
            if self._used >= self.lines:
                self._held += 1
                return None
            self._used += 1
            held, self._held = self._held, 0
            return held


# ---------------------------------------------------------------------------------------------------------
# The guard
# ---------------------------------------------------------------------------------------------------------


class Guard:
    """The LAN checks of one app: `check(environ)` before each route, `response_headers(...)` after it,
    and the session routes' answers (`sign_in`, `sign_out`)."""

    def __init__(
        self,
        *,
        key: str = "",
        allowed_hosts: tuple[str, ...] | list[str] = (),
        allowed_origins: tuple[str, ...] | list[str] = (),
        session_hours: float = 24,
        failures_per_minute: int = 10,
        hostname: str | None = None,
        now: Callable[[], float] = time.time,
        clients: int = TRACKED_CLIENTS,
    ):
        self.key = key
        self.session_seconds = int(session_hours * 3600)
        self.now = now
        hostname = (socket.gethostname() if hostname is None else hostname).lower().rstrip(".")
        names = {"localhost"}
        if hostname:
            names |= {hostname, hostname.split(".")[0] + ".local"}
        hosts = [h.strip().lower().rstrip(".") for h in allowed_hosts if h.strip()]
        self.any_host = "*" in hosts
        self.host_names = frozenset(names | {h for h in hosts if not h.startswith(".")})
        self.host_suffixes = tuple(h for h in hosts if h.startswith(".") and len(h) > 1)
        origins = {normal_origin(o) for o in allowed_origins}
        if None in origins:
            raise ValueError(f"ALLOWED_ORIGINS holds something that is not an http(s) origin: {allowed_origins}")
        self.allowed_origins = frozenset(o for o in origins if o)
        self.failures = FailureLimiter(failures_per_minute, clients, now=now)
        self._log_budget = _LogBudget(LOG_LINES_PER_WINDOW, now)
        # Comparing digests takes the same time whatever the length of the guess.
        self._key_digest = hashlib.sha256(key.encode()).digest() if key else b""
        self._token_secret = hmac.new(key.encode(), _TOKEN_CONTEXT, hashlib.sha256).digest() if key else b""

    @property
    def mode(self) -> str:
        """What /health says: "open" or "key"."""
        return "key" if self.key else "open"

    def announce(self, host: str) -> None:
        """Say once at start whether the API needs a key; warn when the LAN can reach an open API."""
        if self.key:
            log.info("the API needs a key (API_KEY); the page signs in for %g h (SESSION_HOURS)", self.session_seconds / 3600)
        elif is_loopback(host):
            log.info("the API is open: no API_KEY is set (HOST %s is loopback: only this machine can reach it)", host)
        else:
            log.warning(
                "the API is open and HOST %s is not a loopback address: anyone on your network can read, add and "
                "delete images. Set API_KEY (README: Serving your LAN)", host,
            )

    # ----- before the route -----

    def check(self, environ: Mapping[str, Any]) -> Answer | None:
        """None to let the request through, else what to answer instead (421, 403, 429, 401, a preflight)."""
        method = environ.get("REQUEST_METHOD", "GET").upper()
        path = environ.get("PATH_INFO", "")
        host = _host_of(environ)
        if _from_browser(environ) and not self.host_allowed(host):
            name = _split_host(host)
            shown = _shown(name[0] if name else host)
            return Answer(
                421,
                f"This service does not answer browsers as {shown!r}: a page there may be a DNS-rebinding attack. "
                f"If that name is yours, add it to ALLOWED_HOSTS (comma-separated) and restart; "
                "else open the service by its address or this machine's name.",
            )
        origin = environ.get("HTTP_ORIGIN")
        listed = origin is not None and normal_origin(origin) in self.allowed_origins
        if method == "OPTIONS" and listed and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ:
            return Answer(204, headers=self._preflight_headers(origin))
        if method not in SAFE_METHODS and not listed:
            if origin is not None and not _same_origin(origin, host):
                return Answer(
                    403,
                    f"A page at {_shown(origin)} may not change anything here (cross-site request). "
                    "If that page is yours, add its origin to ALLOWED_ORIGINS and restart.",
                )
            if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
                return Answer(
                    403,
                    "The browser says this write comes from another site (Sec-Fetch-Site: cross-site). "
                    "If that page is yours, add its origin to ALLOWED_ORIGINS and restart.",
                )
        if not self.key:
            return None
        client = client_of(environ)
        if method == "POST" and path == "/session":
            return self._too_many(client)  # the key is checked by sign_in
        if self._open_route(method, path):
            return None
        presented = _presented_key(environ)
        if presented is not None:
            refused = self._too_many(client)  # while it waits, a client's keys are not even compared
            if refused is not None:
                return refused
            return None if self.key_matches(presented) else self._wrong_key(client)
        token = _cookie(environ)
        if token is not None:
            if self.token_valid(token):
                return None
            return Answer(
                401,
                "Your sign-in has expired (SESSION_HOURS) or the API key has changed: sign in again.",
                (("WWW-Authenticate", "Bearer"), ("Set-Cookie", self._cookie_header("", 0, environ))),
            )
        return Answer(
            401,
            "This service needs its API key (API_KEY): send Authorization: Bearer <key> or X-API-Key: <key>, "
            'or sign in on the page (POST /session with {"key": "<key>"}).',
            (("WWW-Authenticate", "Bearer"),),
        )

    def check_key(self, presented: str, environ: Mapping[str, Any]) -> Answer | None:
        """None when `presented`, a key sent another way than a header (the api_key form field of the
        DeepStack-compatible routes), is the key; else the refusal check() gives a wrong key (429 while
        the client waits, 401 counted against it)."""
        client = client_of(environ)
        refused = self._too_many(client)
        if refused is not None:
            return refused
        return None if self.key_matches(presented) else self._wrong_key(client)

    def host_allowed(self, host_header: str) -> bool:
        """Whether a browser may name this service so: any IP address, localhost, this machine's name and
        <name>.local, and ALLOWED_HOSTS (names, `.suffix` for a domain and its subdomains, `*` for any)."""
        if self.any_host:
            return True
        split = _split_host(host_header)
        if split is None:
            return False
        name = split[0]
        if _is_ip(name) or name in self.host_names:
            return True
        return any(name == s[1:] or name.endswith(s) for s in self.host_suffixes)

    @staticmethod
    def _open_route(method: str, path: str) -> bool:
        """What needs no key: the page, its files and /health (POST /session is handled by check)."""
        return method in ("GET", "HEAD") and (path in ("/", "/health") or path.startswith("/static/"))

    def _too_many(self, client: str) -> Answer | None:
        wait = self.failures.wait(client)
        if not wait:
            return None
        return Answer(
            429,
            f"Too many wrong API keys from your address (AUTH_FAILURES, {self.failures.limit} a minute): "
            f"try again in {wait} s with the right key.",
            (("Retry-After", str(wait)),),
        )

    def _wrong_key(self, client: str) -> Answer:
        count, blocked = self.failures.fail(client)
        held = self._log_budget.take()
        if held is not None:
            more = f" ({held} more not logged)" if held else ""
            if blocked:
                log.warning(
                    "%s sent %d wrong API keys within a minute: refused (429) for %d s%s",
                    client, count, FAILURE_WINDOW, more,
                )
            else:
                log.warning("wrong API key from %s (%d within a minute)%s", client, count, more)
        return Answer(
            401,
            "The API key is wrong: send the one this service was started with (API_KEY), "
            "as Authorization: Bearer <key> or X-API-Key: <key>.",
            (("WWW-Authenticate", "Bearer"),),
        )

    def key_matches(self, presented: str) -> bool:
        if not self.key:
            return False
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        return hmac.compare_digest(digest, self._key_digest)

    # ----- sessions: signed tokens that carry their expiry -----

    def _signature(self, expires: int, nonce: str) -> str:
        mac = hmac.new(self._token_secret, f"v1.{expires}.{nonce}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()

    def new_token(self) -> str:
        expires = int(self.now()) + self.session_seconds
        nonce = secrets.token_urlsafe(9)
        return f"v1.{expires}.{nonce}.{self._signature(expires, nonce)}"

    def token_valid(self, token: str) -> bool:
        if not self.key or len(token) > MAX_TOKEN_LENGTH:
            return False
        parts = token.split(".")
        if len(parts) != 4 or parts[0] != "v1" or not parts[1].isdigit():
            return False
        expires = int(parts[1])
        if expires <= self.now():
            return False
        return hmac.compare_digest(self._signature(expires, parts[2]).encode(), parts[3].encode("utf-8", "replace"))

    def _cookie_header(self, token: str, max_age: int, environ: Mapping[str, Any]) -> str:
        secure = "; Secure" if environ.get("wsgi.url_scheme") == "https" else ""
        return f"{SESSION_COOKIE}={token}; Max-Age={max_age}; Path=/; HttpOnly; SameSite=Strict{secure}"

    def sign_in(self, key: str, environ: Mapping[str, Any]) -> Answer:
        """POST /session: a cookie holding a new token for the right key (never the key itself)."""
        if not self.key:
            return Answer(
                409,
                "This service has no API key (API_KEY is unset): every route is open, there is nothing to sign in to.",
            )
        client = client_of(environ)
        refused = self._too_many(client)
        if refused is not None:
            return refused
        if not self.key_matches(key):
            return self._wrong_key(client)
        return Answer(204, headers=(("Set-Cookie", self._cookie_header(self.new_token(), self.session_seconds, environ)),))

    def sign_out(self, environ: Mapping[str, Any]) -> Answer:
        """DELETE /session: the browser forgets its cookie. (Tokens are not stored, so a copied one stays
        valid until it expires; changing the key ends them all.)"""
        return Answer(204, headers=(("Set-Cookie", self._cookie_header("", 0, environ)),))

    # ----- after the route -----

    def response_headers(self, environ: Mapping[str, Any], content_type: str) -> list[tuple[str, str]]:
        """Headers to add to an answer: the page's security headers on HTML, CORS for a listed origin."""
        out: list[tuple[str, str]] = []
        if content_type.split(";", 1)[0].strip().lower() == "text/html":
            out.extend(HTML_HEADERS)
        if self.allowed_origins:
            out.append(("Vary", "Origin"))
            origin = environ.get("HTTP_ORIGIN")
            if origin is not None and normal_origin(origin) in self.allowed_origins:
                out += [("Access-Control-Allow-Origin", origin.strip()), ("Access-Control-Expose-Headers", CORS_EXPOSED)]
        return out

    def _preflight_headers(self, origin: str) -> tuple[tuple[str, str], ...]:
        return (
            ("Access-Control-Allow-Origin", origin.strip()),
            ("Access-Control-Allow-Methods", CORS_METHODS),
            ("Access-Control-Allow-Headers", CORS_ALLOWED_HEADERS),
            ("Access-Control-Max-Age", "600"),
            ("Vary", "Origin"),
        )


def from_settings(settings: Any, *, now: Callable[[], float] = time.time) -> Guard:
    """The Guard for a Settings object (duck-typed: this module does not import settings).
    Raises KeyUnusable when API_KEY / API_KEY_FILE cannot be used."""
    return Guard(
        key=read_key(settings.api_key, settings.api_key_file),
        allowed_hosts=settings.allowed_hosts,
        allowed_origins=settings.allowed_origins,
        session_hours=settings.session_hours,
        failures_per_minute=settings.auth_failures,
        now=now,
    )

