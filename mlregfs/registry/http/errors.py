"""The one place where HTTP statuses, socket/http.client errors and httpx exceptions become
mlregfs.errors types, wrapped in a `Failure` that tells the retry loop how to treat them.

Messages are built from the method, the host-less path, the status and the (scrubbed) GitLab
message body: never a URL query (signatures), never a header value.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Mapping
from urllib.parse import urlsplit

import httpx

from mlregfs.errors import (
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    ProtocolError,
    RateLimited,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    ServerError,
    TooLarge,
    Unauthorized,
)
from mlregfs.registry.retry import parse_retry_after

ERROR_DETAIL_CHARS = 200

# a message -> the same message without the token (the client's belt and braces)
Scrub = Callable[[str], str]


class Failure(Exception):
    """One failed attempt: the error to raise if we give up, and how retryable it is.

    `outage=False` marks a failure that says nothing about the registry being down (a body
    cut short, a request over its deadline): it does not switch on the fail-fast outage mode.
    """

    def __init__(
        self,
        error: RegistryError,
        *,
        retryable: bool = True,
        retry_after: float | None = None,
        outage: bool = True,
    ) -> None:
        super().__init__(str(error))
        self.error = error
        self.retryable = retryable
        self.retry_after = retry_after
        self.outage = outage


class Answered(Exception):
    """The peer answered, but not with a usable HTTP/1.1 message (closed early, garbage)."""


def where_of(url: str) -> str:
    """Host-less path of a URL for messages: never the query (signatures), never userinfo."""
    return urlsplit(url).path or "/"


def describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------- statuses


def error_class(status: int, detail: str = "") -> type[RegistryError]:
    """The error type of an HTTP status (and, for a 400, of GitLab's message)."""
    if status == 400:
        if "RESOURCE_ALREADY_EXISTS" in detail:
            return Conflict
        return TooLarge if "too large" in detail.lower() else BadRequest
    if status == 401:
        return Unauthorized
    if status == 403:
        return Forbidden
    if status in (404, 410):
        return NotFound
    if status == 409:
        return Conflict
    if status == 413:
        return TooLarge
    if status == 429:
        return RateLimited
    if status >= 500:
        return ServerError
    if 400 <= status < 500:
        return BadRequest
    return ProtocolError


def status_error(status: int, message: str) -> RegistryError:
    """An error for a status the caller explains itself (a project 401, a model's 404)."""
    return error_class(status)(message, status=status)


def status_failure(
    where: str, status: int, headers: Mapping[str, str], body: bytes, scrub: Scrub
) -> Failure:
    """An HTTP answer we do not accept, as a Failure: `where` is "METHOD /path"."""
    detail = scrub(error_detail(body))
    message = f"{where} -> {status}" + (f": {detail}" if detail else "")
    retry_after = None
    if status == 429 or status >= 500:
        # lower-case: byte answers come with lower-case names, httpx.Headers ignores case
        retry_after = parse_retry_after(headers.get("retry-after"), time.time())
    cls = error_class(status, detail)
    retryable = status == 429 or status >= 500
    return Failure(cls(message, status=status), retryable=retryable, retry_after=retry_after)


def error_detail(body: bytes) -> str:
    """The message part of a GitLab error body, one line, truncated. Never headers."""
    text = body[:4096].decode("utf-8", errors="replace").strip()
    if not text:
        return ""
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        parts = []
        for key in ("error_code", "message", "error", "error_description"):
            value = data.get(key)
            if isinstance(value, dict):  # {"message": {"error": "..."}}
                value = "; ".join(f"{k}: {v}" for k, v in value.items())
            if value:
                parts.append(str(value))
        text = " - ".join(parts) if parts else text
    elif text.startswith("<"):
        return "(HTML page)"
    text = " ".join(text.split())
    return text if len(text) <= ERROR_DETAIL_CHARS else text[: ERROR_DETAIL_CHARS - 3] + "..."


# ---------------------------------------------------------------------------------- no answer


def socket_failure(where: str, exc: Exception, timeout: float, scrub: Scrub) -> Failure:
    """A socket, http.client or HTTP framing error of the byte path.

    Every one is retried like a dropped connection; a body cut short or a keep-alive
    connection the server closed says the registry is up (no fail-fast outage mode)."""
    if isinstance(exc, TimeoutError):
        return Failure(RegistryTimeout(f"{where}: no answer within {timeout:g} s"))
    # short body, closed keep-alive, garbage instead of an answer
    answered = isinstance(exc, http.client.HTTPException | Answered)
    return Failure(RegistryUnavailable(scrub(f"{where}: {describe(exc)}")), outage=not answered)


def httpx_failure(where: str, exc: httpx.HTTPError, timeout: float, scrub: Scrub) -> Failure:
    """An httpx exception (no HTTP status) of a JSON request."""
    if isinstance(exc, httpx.TimeoutException):
        return Failure(RegistryTimeout(f"{where}: no answer within {timeout:g} s"))
    if isinstance(exc, httpx.TransportError):
        # RemoteProtocolError: the peer closed mid-body; it answered, so no outage mode
        answered = isinstance(exc, httpx.RemoteProtocolError)
        message = scrub(f"{where}: {describe(exc)}")
        return Failure(RegistryUnavailable(message), outage=not answered)
    return Failure(ProtocolError(scrub(f"{where}: {describe(exc)}")))


def operation_timeout(where: str, deadline: float) -> Failure:
    """An operation whose retries ran past its total deadline: not an outage by itself."""
    return Failure(
        RegistryTimeout(f"{where}: no answer within {deadline:g} s"), retryable=False, outage=False
    )


def over_deadline(where: str, budget: float) -> Failure:
    """A request that ran past its own deadline: the registry may well be up."""
    return Failure(
        RegistryTimeout(f"{where}: no complete answer within {budget:g} s"), outage=False
    )


def abandoned(where: str) -> Failure:
    """A worker-thread request cut off by its deadline or its caller's cancellation."""
    return Failure(RegistryTimeout(f"{where}: abandoned"), outage=False)


def client_closed() -> Failure:
    return Failure(RegistryUnavailable("registry client closed"), retryable=False)


# ---------------------------------------------------------------------------------- framing


def protocol(message: str) -> Failure:
    """An answer that breaks HTTP or GitLab's rules in a way asking again will not mend."""
    return Failure(ProtocolError(message), retryable=False)


def not_json(where: str, status: int) -> Failure:
    return Failure(ProtocolError(f"{where} -> {status}: body is not JSON"))


def no_location(where: str, status: int) -> Failure:
    return protocol(f"{where} -> {status} without Location")


def truncated(where: str, got: int, want: int) -> Failure:
    """A body that ended early: like a dropped connection (full retry budget), not an outage."""
    return Failure(
        RegistryUnavailable(f"{where}: body cut short, got {got} of {want} bytes"), outage=False
    )


def changed(where: str, size: int, listed: int) -> Failure:
    """The file's size is not the listed one: asking again gets the same answer."""
    return protocol(
        f"{where}: file is {size} bytes but was listed as {listed}; it changed on the "
        "registry, list it again"
    )
