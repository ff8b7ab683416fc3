"""Where Galvani may send a request on a brand's word: a notification channel's URL.

A brand chooses the URL and the dispatcher POSTs to it from inside the installation, so an
unchecked URL would let a brand reach the services beside it (the database's host, a cloud's
metadata address 169.254.169.254, an admin port on loopback): server-side request forgery.
:func:`check_url` refuses, unless the operator's policy allows them, plain ``http`` and every
address that is not globally routable; it resolves the host name and checks every address it
resolves to, so a public name pointing at 127.0.0.1 is refused like 127.0.0.1 itself.

The API checks when a channel is created; the dispatcher checks again at each send, because
what a name resolves to can change afterwards (DNS rebinding), and should connect to one of
the addresses :func:`check_url` returns rather than resolve the name a second time.
"""

import concurrent.futures
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

from services.common.errors import GalvaniError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# (host, port) -> the addresses the host resolves to; raises RefusedUrl when it cannot say.
Resolver = Callable[[str, int], list[IPAddress]]

MAX_URL_LENGTH: Final = 2048
RESOLVE_TIMEOUT_S: Final = 5.0
DEFAULT_PORTS: Final = {"https": 443, "http": 80}
# NAT64's well-known prefix (RFC 6052): the last 32 bits are an IPv4 address a NAT64 gateway
# forwards to, so 64:ff9b::a00:1 reaches 10.0.0.1.
NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
# One resolver thread pool for the process: getaddrinfo has no timeout of its own.
_resolver_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="resolve")


class RefusedUrl(GalvaniError):
    """A URL Galvani will not send to; the message says why, in a sentence for the brand."""


@dataclass(frozen=True)
class OutboundPolicy:
    """What the operator allows beyond public ``https`` targets."""

    allow_private: bool = False
    allow_http: bool = False


@dataclass(frozen=True)
class CheckedUrl:
    """A URL that passed :func:`check_url`: its normalised form and where it leads."""

    url: str
    scheme: str
    host: str
    port: int
    addresses: tuple[IPAddress, ...]


def system_resolver(timeout_s: float = RESOLVE_TIMEOUT_S) -> Resolver:
    """A resolver on the system's ``getaddrinfo`` (hosts file, DNS), giving up after
    ``timeout_s``."""

    def resolve(host: str, port: int) -> list[IPAddress]:
        future = _resolver_pool.submit(
            socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
        try:
            infos = future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise RefusedUrl(
                f"the host {host!r} could not be resolved within {timeout_s:g} s"
            ) from None
        except (socket.gaierror, UnicodeError) as exc:
            raise RefusedUrl(f"the host {host!r} does not resolve ({exc})") from None
        # sockaddr[0] of an IPv6 address may carry a scope ("fe80::1%eth0").
        return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]

    return resolve


def refusal(address: IPAddress) -> str | None:
    """What kind of non-public address ``address`` is ("a loopback address"), or None for a
    public one. An IPv6 address that carries an IPv4 address (mapped, 6to4, NAT64) is judged
    by the IPv4 address it reaches."""
    embedded = _embedded_ipv4(address)
    if embedded is not None:
        kind = refusal(embedded)
        return None if kind is None else f"{kind} (it carries {embedded})"
    checks = (
        (address.is_unspecified, "an unspecified"),
        (address.is_loopback, "a loopback"),
        (address.is_link_local, "a link-local"),
        (address.is_multicast, "a multicast"),
        (address.is_reserved, "a reserved"),
        (address.is_private, "a private"),
        (not address.is_global, "a not globally routable"),
    )
    for refused, kind in checks:
        if refused:
            return f"{kind} address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def check_url(url: str, policy: OutboundPolicy, resolve: Resolver | None = None) -> CheckedUrl:
    """``url`` normalised, with the addresses its host resolves to, or :class:`RefusedUrl`
    saying why Galvani will not send to it under ``policy``."""
    if len(url) > MAX_URL_LENGTH:
        raise RefusedUrl(f"the URL is longer than {MAX_URL_LENGTH} characters")
    if any(ord(char) <= 0x20 or ord(char) == 0x7F for char in url):
        raise RefusedUrl("the URL contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise RefusedUrl(f"not a URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise RefusedUrl(f"the scheme must be https, not {scheme or 'none'!r}")
    if scheme == "http" and not policy.allow_http:
        raise RefusedUrl(
            "the URL must use https: plain http would send alerts and their signatures "
            "unencrypted (the operator may allow http targets)"
        )
    if parts.username is not None or parts.password is not None:
        raise RefusedUrl(
            "the URL must not carry credentials (user:password@): it is stored and shown "
            "in plain text; the receiver authenticates deliveries by their signature"
        )
    host = parts.hostname
    if not host:
        raise RefusedUrl("the URL names no host")
    if parts.fragment:
        raise RefusedUrl("the URL must not have a fragment (#...): it is never sent")
    port = port if port is not None else DEFAULT_PORTS[scheme]
    if port == 0:
        raise RefusedUrl("port 0 cannot be connected to")
    addresses = _literal(host)
    if addresses is None:
        addresses = (resolve or system_resolver())(host, port)
    if not addresses:
        raise RefusedUrl(f"the host {host!r} resolves to no address")
    if not policy.allow_private:
        for address in addresses:
            kind = refusal(address)
            if kind is None:
                continue
            if str(address) == host:
                reason = f"{host} is {kind}"
            else:
                reason = f"the host {host!r} resolves to {address}, {kind}"
            raise RefusedUrl(
                f"{reason}; Galvani sends only to public addresses (the operator may allow"
                " private targets)"
            )
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    normalised = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    return CheckedUrl(normalised, scheme, host, port, tuple(dict.fromkeys(addresses)))


def _literal(host: str) -> list[IPAddress] | None:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        return None
