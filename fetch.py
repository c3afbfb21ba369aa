"""Safe downloading of user-supplied image URLs.

This is the only place in the service that opens outbound connections on
behalf of strangers, so it defends against server-side request forgery:
every hop's host is resolved once, every resolved address is checked against
a table of non-public ranges, and the connection goes to a checked address
(never a second lookup, which is what DNS rebinding relies on).  Redirects,
size, total time and content encoding are all enforced here.

Stdlib only; the HTTP layer and the job queue call :class:`Fetcher`.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import logging
import re
import socket
import ssl
import threading
import time
import unicodedata
import urllib.parse
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

__all__ = [
    "FetchError",
    "InvalidURL",
    "BlockedAddress",
    "TooLarge",
    "UpstreamStatus",
    "NotAnImage",
    "Unreachable",
    "TooManyRedirects",
    "DownloadTimeout",
    "Download",
    "Fetcher",
    "check_url",
    "blocked_reason",
    "default_resolve",
    "for_log",
]

MAX_URL_LENGTH = 2048
LOG_TEXT_CHARS = 200  # a URL or host in a log line is cut to this: strangers' 2 KB URLs must not fill the log
_REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
_DEFAULT_PORTS = {"http": 80, "https": 443}
_CHUNK = 64 * 1024


# --------------------------------------------------------------------------
# Errors

class FetchError(Exception):
    """Base; str(e) is a readable sentence telling the user what was wrong and what to do.

    server.py maps each subclass to an HTTP status (ERROR_STATUS); this module knows nothing of HTTP.
    """



class InvalidURL(FetchError):
    """The URL is malformed or uses something we never fetch (scheme, userinfo, ...)."""



class BlockedAddress(FetchError):
    """The host resolves to an address that is not on the public internet."""



class TooLarge(FetchError):
    """The body is (or announces itself as) larger than the configured limit."""



class UpstreamStatus(FetchError):
    """The remote server answered with an error status; ``.status`` is its code."""


    def __init__(self, status: int, message: str | None = None):
        if message is None:
            message = f"The remote server answered with HTTP status {status}."
        super().__init__(message)
        self.status = status

    def __reduce__(self):
        # Keeps the exception picklable for the job queue despite the custom __init__.
        return (type(self), (self.status, self.args[0]))


class NotAnImage(FetchError):
    """The Content-Type says this is clearly not an image (e.g. a web page)."""



class Unreachable(FetchError):
    """DNS failure, refused/reset connection, TLS failure or a malformed response."""



class TooManyRedirects(FetchError):
    """Too many redirects, a redirect loop, or a redirect without a usable Location."""



class DownloadTimeout(FetchError):
    """The total time allowed for the download ran out."""



@dataclass(frozen=True)
class Download:
    """A successful download."""

    url: str  # the URL asked for
    final_url: str  # after redirects
    content_type: str | None  # media type only, lower-cased, no parameters
    data: bytes


# --------------------------------------------------------------------------
# Address policy

_net = ipaddress.ip_network
_BLOCKED_NETWORKS: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = (
    # Most specific first: the first match names the reason.
    (_net("0.0.0.0/32"), "unspecified"),
    (_net("0.0.0.0/8"), "this-network"),
    (_net("10.0.0.0/8"), "private"),
    (_net("100.64.0.0/10"), "shared address space (CGNAT)"),
    (_net("127.0.0.0/8"), "loopback"),
    (_net("169.254.0.0/16"), "link-local"),
    (_net("172.16.0.0/12"), "private"),
    (_net("192.0.0.0/24"), "IETF protocol assignment"),
    (_net("192.0.2.0/24"), "documentation (TEST-NET-1)"),
    (_net("192.88.99.0/24"), "6to4 relay anycast"),
    (_net("192.168.0.0/16"), "private"),
    (_net("198.18.0.0/15"), "benchmarking"),
    (_net("198.51.100.0/24"), "documentation (TEST-NET-2)"),
    (_net("203.0.113.0/24"), "documentation (TEST-NET-3)"),
    (_net("224.0.0.0/4"), "multicast"),
    (_net("255.255.255.255/32"), "broadcast"),
    (_net("240.0.0.0/4"), "reserved"),
    (_net("::/128"), "unspecified"),
    (_net("::1/128"), "loopback"),
    (_net("::ffff:0:0/96"), "IPv4-mapped IPv6"),
    (_net("::/96"), "IPv4-compatible IPv6"),
    (_net("64:ff9b::/96"), "NAT64 (embeds IPv4)"),
    (_net("64:ff9b:1::/48"), "local-use NAT64 (embeds IPv4)"),
    (_net("100::/64"), "discard-only"),
    (_net("2001::/32"), "Teredo (embeds IPv4)"),
    (_net("2001:2::/48"), "benchmarking"),
    (_net("2001:10::/28"), "ORCHID"),
    (_net("2001:db8::/32"), "documentation"),
    (_net("2002::/16"), "6to4 (embeds IPv4)"),
    (_net("3fff::/20"), "documentation"),
    (_net("5f00::/16"), "SRv6 SID"),
    (_net("fc00::/7"), "unique-local"),
    (_net("fe80::/10"), "link-local"),
    (_net("fec0::/10"), "site-local"),
    (_net("ff00::/8"), "multicast"),
)
del _net
_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def blocked_reason(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Return None if ``ip`` may be fetched from, else a short reason such as "loopback"."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.scope_id is not None:
        # A zone index only makes sense for non-global addresses anyway; drop it
        # so table lookups see the bare address.
        ip = ipaddress.IPv6Address(int(ip))
    for network, reason in _BLOCKED_NETWORKS:
        if ip.version == network.version and ip in network:
            return reason
    if ip.version == 6 and ip not in _IPV6_GLOBAL_UNICAST:
        # Everything outside 2000::/3 is unallocated or special-purpose today.
        return "not global unicast"
    # is_global alone misses ranges on 3.11 (hence the table), but it also
    # tracks IANA registry entries the table does not spell out.
    if not ip.is_global:
        return "not globally routable"
    return None


# --------------------------------------------------------------------------
# URL syntax

_HOSTNAME_RE = re.compile(r"^[a-z0-9_-]+(?:\.[a-z0-9_-]+)*\.?$")


def _bad_char(ch: str) -> bool:
    if ch == "\\" or ch.isspace():
        return True
    # Control, format (e.g. bidi overrides, zero-width), surrogate, private-use,
    # unassigned and separator characters have no business in a URL.
    return unicodedata.category(ch)[0] in "CZ"


def _host_and_port(parts: urllib.parse.SplitResult, url: str) -> tuple[str, int, str]:
    """Return (host for resolution/TLS, port, Host header value); raise InvalidURL."""
    netloc = parts.netloc
    if "@" in netloc:
        raise InvalidURL(
            f"URLs with a user name or password are not accepted: {url!r}. "
            "Remove the 'user:password@' part."
        )
    if netloc.startswith("["):
        end = netloc.find("]")
        if end == -1:
            raise InvalidURL(f"The IPv6 address in {url!r} is missing its closing ']'.")
        host = netloc[1:end]
        rest = netloc[end + 1:]
        if rest and not rest.startswith(":"):
            raise InvalidURL(f"Unexpected text after the IPv6 address in {url!r}.")
        port_text = rest[1:] if rest else ""
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise InvalidURL(
                f"{host!r} in {url!r} is not a valid IPv6 address "
                "(zone indexes such as %eth0 are not supported)."
            ) from None
        header_host = f"[{host}]"
        host = host.lower()
    else:
        host, sep, port_text = netloc.partition(":")
        if ":" in port_text:
            raise InvalidURL(
                f"The host in {url!r} looks like an IPv6 address without brackets; "
                "write it as http://[address]/."
            )
        header_host = host
        host = host.lower()
        if not host:
            raise InvalidURL(f"The URL {url!r} has no host name. Use a full URL like https://example.com/image.png.")
        if not host.isascii():
            raise InvalidURL(
                f"The host name in {url!r} contains non-ASCII characters; "
                "give it in its xn-- (punycode) form."
            )
        if not _HOSTNAME_RE.match(host) or len(host) > 254:
            raise InvalidURL(f"{header_host!r} in {url!r} is not a valid host name.")
    if not port_text:
        return host, _DEFAULT_PORTS[parts.scheme], header_host
    if not (port_text.isascii() and port_text.isdigit()) or not 1 <= int(port_text) <= 65535:
        raise InvalidURL(f"The port in {url!r} must be a number from 1 to 65535.")
    return host, int(port_text), f"{header_host}:{int(port_text)}"


def for_log(text: str, limit: int = LOG_TEXT_CHARS) -> str:
    """`text` (a URL, a host) cut to at most `limit` characters, ending in "..." when cut, for a log line."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_url(url: str) -> urllib.parse.SplitResult:
    """Check a URL's syntax (no DNS) and return it split; raise InvalidURL if it cannot be fetched."""
    if not isinstance(url, str) or not url:
        raise InvalidURL("No URL was given. Send a full http:// or https:// URL.")
    if len(url) > MAX_URL_LENGTH:
        raise InvalidURL(f"The URL is {len(url)} characters long; at most {MAX_URL_LENGTH} are accepted.")
    for ch in url:
        if _bad_char(ch):
            raise InvalidURL(
                f"The URL contains a backslash, whitespace or control character ({ch!r}); "
                "percent-encode it or fix the URL."
            )
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:
        raise InvalidURL(f"The URL {url!r} could not be parsed ({exc}).") from None
    if parts.scheme not in _DEFAULT_PORTS:
        shown = parts.scheme or "none"
        raise InvalidURL(f"Only http:// and https:// URLs can be fetched (the scheme was {shown!r}).")
    _host_and_port(parts, url)
    return parts


def _request_target(parts: urllib.parse.SplitResult) -> str:
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    # check_url has already refused whitespace and controls, so this only
    # percent-encodes non-ASCII text (as browsers do); existing escapes stay.
    return urllib.parse.quote(target, safe="".join(chr(c) for c in range(0x21, 0x7F)))


def _defragment(url: str) -> str:
    return urllib.parse.urldefrag(url)[0]


# --------------------------------------------------------------------------
# Seams

def _literal_addresses(host: str) -> list[str] | None:
    """The addresses of a host that needs no DNS (an IP literal, a numeric form, localhost), else None."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    bare = host[:-1] if host.endswith(".") else host
    if bare and all(c.isascii() and (c.isalnum() or c == ".") for c in bare):
        try:
            return [socket.inet_ntoa(socket.inet_aton(bare))]
        except OSError:
            pass
    bare = bare.lower()
    if bare == "localhost" or bare.endswith(".localhost"):
        return ["127.0.0.1", "::1"]
    return None


def default_resolve(host: str, port: int) -> list[str]:
    """Resolve ``host`` to its unique addresses, in order.

    IP literals, including the legacy numeric forms inet_aton understands
    (``2130706433``, ``0x7f.1``, ``0177.0.0.1``, ``127.1``), are normalised
    here so they are checked as the address they really denote, whatever the
    platform's getaddrinfo makes of them.  ``localhost`` names never go to DNS
    (RFC 6761).
    """
    literal = _literal_addresses(host)
    if literal is not None:
        return literal
    seen: dict[str, None] = {}
    for _family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        seen.setdefault(str(sockaddr[0]), None)
    return list(seen)


def _default_connect(address: tuple[str, int], timeout: float) -> socket.socket:
    return socket.create_connection(address, timeout=timeout)


# --------------------------------------------------------------------------
# Deadline-bounded reading

class _DeadlineReader(io.RawIOBase):
    """Raw reader that re-arms the socket timeout to the time left before every recv.

    http.client's readline/read loop over many recv calls; with a plain socket
    timeout a server dripping one byte at a time would never time out.
    """

    def __init__(self, sock: socket.socket, remaining: Callable[[], float], what: str):
        super().__init__()
        self._sock = sock
        self._remaining = remaining
        self._what = what

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self._remaining()
        if left <= 0:
            raise DownloadTimeout(self._what)
        self._sock.settimeout(left)
        try:
            return self._sock.recv_into(buffer)
        except TimeoutError:
            raise DownloadTimeout(self._what) from None


class _SocketShim:
    """What http.client.HTTPResponse needs from a socket: just makefile()."""

    def __init__(self, reader: _DeadlineReader):
        self._reader = reader

    def makefile(self, mode: str, *args, **kwargs):
        return io.BufferedReader(self._reader, _CHUNK)


# --------------------------------------------------------------------------
# Fetcher

class Fetcher:
    """Downloads one URL at a time under the SSRF policy and the configured limits.

    ``resolve(host, port) -> list[str]`` and ``connect((address, port), timeout) -> socket``
    are seams for tests; ``now`` is the clock used for the total deadline.
    ``allow_private=True`` lifts only the address check.
    """

    def __init__(
        self,
        *,
        max_bytes: int,
        timeout: float = 10.0,
        allow_private: bool = False,
        max_redirects: int = 3,
        resolve: Callable[[str, int], list[str]] | None = None,
        connect: Callable[[tuple[str, int], float], socket.socket] | None = None,
        now: Callable[[], float] = time.monotonic,
        user_agent: str = "imgsvc-fetch/1",
        ssl_context: ssl.SSLContext | None = None,
    ):
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        if not timeout > 0:
            raise ValueError("timeout must be positive")
        if max_redirects < 0:
            raise ValueError("max_redirects must not be negative")
        if any(_bad_char(c) and c != " " for c in user_agent) or not user_agent.isascii():
            raise ValueError("user_agent must be printable ASCII")
        self._max_bytes = max_bytes
        self._timeout = timeout
        self._allow_private = allow_private
        self._max_redirects = max_redirects
        self._resolve = resolve or default_resolve
        self._connect = connect or _default_connect
        self._now = now
        self._user_agent = user_agent
        self._ssl_context = ssl_context or ssl.create_default_context()

    def fetch(self, url: str) -> Download:
        """Download ``url``, following redirects by hand; raise a FetchError subclass on failure."""
        started = self._now()
        deadline = started + self._timeout
        current = url
        parts = check_url(url)
        seen = {_defragment(url)}
        redirects = 0
        while True:
            location, content_type, data = self._hop(current, parts, deadline)
            if location is None:
                assert data is not None
                log.debug(
                    "fetched %s (final %s): %d bytes, %d ms, %d redirect(s)",
                    for_log(url), for_log(current), len(data), (self._now() - started) * 1000, redirects,
                )
                return Download(url=url, final_url=current, content_type=content_type, data=data)
            target = urllib.parse.urljoin(current, location)
            try:
                next_parts = check_url(target)
            except InvalidURL as exc:
                raise TooManyRedirects(
                    f"{current} redirected to a location that cannot be fetched: {exc}"
                ) from None
            if _defragment(target) in seen:
                raise TooManyRedirects(f"{current} redirected back to {target}: redirect loop. The URL can never resolve to an image.")
            redirects += 1
            if redirects > self._max_redirects:
                raise TooManyRedirects(
                    f"{url} redirected more than {self._max_redirects} times; "
                    "link to the final image URL directly."
                )
            seen.add(_defragment(target))
            current, parts = target, next_parts

    # -- one request -------------------------------------------------------

    def _remaining(self, deadline: float) -> float:
        return deadline - self._now()

    def _timeout_error(self, url: str) -> DownloadTimeout:
        return DownloadTimeout(
            f"Downloading {url} took longer than {self._timeout:g} seconds; "
            "the server is too slow or the file too big."
        )

    def _hop(self, url: str, parts: urllib.parse.SplitResult, deadline: float):
        """Do one request. Return (location, None, None) for a redirect, else (None, content_type, data)."""
        host, port, host_header = _host_and_port(parts, url)
        addresses = self._checked_addresses(url, host, port, deadline)
        timeout_message = str(self._timeout_error(url))
        raw = self._open(url, host, port, addresses, deadline)
        conn = raw
        response = None
        try:
            if parts.scheme == "https":
                left = self._remaining(deadline)
                if left <= 0:
                    raise self._timeout_error(url)
                raw.settimeout(left)
                # The handshake verifies the certificate against the host the
                # user named, not the address we connected to.
                conn = self._ssl_context.wrap_socket(raw, server_hostname=host.rstrip(".") or host)
            request = (
                f"GET {_request_target(parts)} HTTP/1.1\r\n"
                f"Host: {host_header}\r\n"
                f"User-Agent: {self._user_agent}\r\n"
                "Accept: image/*\r\n"
                "Accept-Encoding: identity\r\n"
                "Connection: close\r\n"
                "\r\n"
            ).encode("ascii")
            left = self._remaining(deadline)
            if left <= 0:
                raise self._timeout_error(url)
            conn.settimeout(left)
            conn.sendall(request)  # the timeout bounds the whole sendall (3.5+)

            reader = _DeadlineReader(conn, lambda: self._remaining(deadline), timeout_message)
            response = http.client.HTTPResponse(_SocketShim(reader), method="GET")
            response.begin()
            return self._handle_response(url, response)
        except FetchError:
            raise
        except TimeoutError:
            raise self._timeout_error(url) from None
        except ssl.SSLError as exc:
            raise Unreachable(f"The secure (TLS) connection to {host} failed: {exc}. Check that the site has a valid certificate.") from None
        except http.client.HTTPException as exc:
            raise Unreachable(f"{host} sent a malformed HTTP response ({type(exc).__name__}: {exc}).") from None
        except OSError as exc:
            raise Unreachable(f"The connection to {host} failed: {exc}. Try again later.") from None
        finally:
            if response is not None:
                response.close()
            conn.close()
            if conn is not raw:
                raw.close()

    def _checked_addresses(self, url: str, host: str, port: int, deadline: float) -> list[str]:
        """Resolve ``host`` once and apply the address policy to every answer."""
        try:
            answers = self._resolve_before(host, port, deadline)
        except FetchError:
            raise
        except (OSError, UnicodeError) as exc:
            raise Unreachable(f"The host name {host!r} could not be resolved ({exc}). Check the URL.") from None
        if self._remaining(deadline) <= 0:
            raise self._timeout_error(url)
        if not answers:
            raise Unreachable(f"The host name {host!r} did not resolve to any address. Check the URL.")
        checked = []
        for answer in answers:
            try:
                ip = ipaddress.ip_address(answer)
            except ValueError:
                raise Unreachable(f"Resolving {host!r} gave an invalid address {answer!r}.") from None
            if not self._allow_private:
                reason = blocked_reason(ip)
                if reason is not None:
                    # DEBUG, not INFO: a job of 1,000 blocked URLs would log 1,000 lines; jobs.py summarises.
                    log.debug("blocked fetch of %s: host %s resolves to %s (%s)", for_log(url), for_log(host), ip, reason)
                    where = f"the address {ip}" if host == str(ip) else f"the host {host} resolves to {ip}, which"
                    raise BlockedAddress(
                        f"Refusing to fetch {url}: {where} is not a public internet address "
                        f"({reason}). Only images on the public internet can be fetched; the operator of a "
                        "trusted LAN can allow its addresses with ALLOW_PRIVATE_URLS=1."
                    )
            checked.append(str(ip))
        return checked

    def _resolve_before(self, host: str, port: int, deadline: float) -> list[str]:
        """Run the resolver, giving up at the deadline.

        getaddrinfo cannot be interrupted, so it runs in a daemon thread; on a
        timeout that thread is abandoned and ends when the system resolver
        gives up by itself.
        """
        if self._resolve is default_resolve:
            literal = _literal_addresses(host)
            if literal is not None:  # nothing to look up, so no thread to bound the lookup's time
                return literal
        result: list = []

        def run():
            try:
                result.append((True, list(self._resolve(host, port))))
            except BaseException as exc:  # handed over to the calling thread
                result.append((False, exc))

        left = self._remaining(deadline)
        if left <= 0:
            raise DownloadTimeout(f"The time allowed ({self._timeout:g} seconds) ran out before {host!r} could be looked up.")
        worker = threading.Thread(target=run, name=f"fetch-resolve {host}", daemon=True)
        worker.start()
        worker.join(left)
        if not result:
            raise DownloadTimeout(
                f"Looking up the host name {host!r} took longer than {self._timeout:g} seconds. Try again later."
            )
        ok, value = result[0]
        if not ok:
            raise value
        return value

    def _open(self, url: str, host: str, port: int, addresses: list[str], deadline: float) -> socket.socket:
        """Connect to the first reachable checked address; never resolves again."""
        errors = []
        for address in addresses:
            left = self._remaining(deadline)
            if left <= 0:
                raise self._timeout_error(url)
            try:
                return self._connect((address, port), left)
            except TimeoutError as exc:
                errors.append(f"{address}: {exc or 'timed out'}")
            except OSError as exc:
                errors.append(f"{address}: {exc.strerror or exc}")
        if self._remaining(deadline) <= 0:
            raise self._timeout_error(url)
        raise Unreachable(
            f"Could not connect to {host} port {port} ({'; '.join(errors)}). "
            "Check the URL or try again later."
        )

    def _handle_response(self, url: str, response: http.client.HTTPResponse):
        status = response.status
        if status in _REDIRECT_STATUSES:
            location = (response.getheader("Location") or "").strip()
            if not location:
                raise TooManyRedirects(f"{url} answered with redirect {status} but gave no Location to go to.")
            return location, None, None
        if status >= 400:
            raise UpstreamStatus(
                status,
                f"The server answered {status} {response.reason} for {url}. "
                "Check that the URL points at an existing, public image.",
            )
        if not 200 <= status < 300:
            raise UpstreamStatus(status, f"The server answered {status} {response.reason} for {url} instead of an image.")

        encoding = (response.getheader("Content-Encoding") or "").strip().lower()
        if encoding not in ("", "identity"):
            # We asked for identity; decompressing would let a small download
            # expand past max_bytes (a "zip bomb"), so refuse instead.
            raise Unreachable(
                f"The server sent {url} compressed (Content-Encoding: {encoding}) although an "
                "uncompressed image was requested; such responses are not accepted."
            )

        content_type = _media_type(response.getheader("Content-Type"))
        if content_type is not None and _clearly_not_image(content_type):
            raise NotAnImage(f"{url} is not an image (the server says it is {content_type}). Link to the image file itself.")

        if response.length is not None and response.length > self._max_bytes:
            raise TooLarge(
                f"{url} is {response.length} bytes; at most {self._max_bytes} bytes are accepted."
            )

        chunks = []
        total = 0
        while True:
            chunk = response.read(min(_CHUNK, self._max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > self._max_bytes:
                raise TooLarge(f"{url} is larger than the {self._max_bytes} bytes accepted.")
        if response.length:
            # http.client reports an early close as a short read, not an error.
            raise Unreachable(
                f"The connection closed after {total} bytes, before all of {url} arrived. Try again later."
            )
        return None, content_type, b"".join(chunks)


def _media_type(value: str | None) -> str | None:
    if not value:
        return None
    media = value.split(";", 1)[0].strip().lower()
    return media or None


def _clearly_not_image(media: str) -> bool:
    kind, _, subtype = media.partition("/")
    if kind in ("text", "multipart"):
        return True
    # "+xml" is deliberately absent: image/svg+xml is an image.
    return subtype in ("html", "xhtml+xml", "json", "xml") or subtype.endswith("+json")
