"""The session every GitLab operation shares: where the project is, the token and which
header carries it, JSON requests with retries, the byte transport, counters, and what the
session learned about the server (is the MLflow API open to us)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

from mlregfs.registry.base import RegistryStats
from mlregfs.registry.http.errors import where_of
from mlregfs.registry.http.rest import JsonTransport, Reply, Rest
from mlregfs.registry.http.retrying import Clock, Retrying, Sleep
from mlregfs.registry.http.transport import Transport
from mlregfs.registry.retry import RetryPolicy
from mlregfs.registry.source import SourceSplit

log = logging.getLogger(__name__)

Route = Literal["api", "mlflow", "ml_models", "storage", "graphql"]
TokenKind = Literal["personal", "job"]
MlflowPart = Literal["models", "runs"]  # asked for separately: each may be refused


class Api:
    """One registry client's connection to one GitLab project (see the module docstring).

    The token is kept here and only ever copied into request headers; `scrub` removes it
    from any text that is about to become an error message."""

    def __init__(
        self,
        split: SourceSplit,
        token: str | None,
        token_kind: TokenKind,
        *,
        timeout: float,
        policy: RetryPolicy,
        transport: JsonTransport | None,
        sleep: Sleep,
        clock: Clock,
        refresh: Callable[[], bool] | None,
        listing_deadline: float,
    ) -> None:
        self.token, self.token_kind = token, token_kind
        self.timeout = timeout
        self.clock = clock
        self.listing_deadline = listing_deadline
        # the first split until the project is resolved (project.py), then the one that worked
        self.api_base = split.api_base
        self.ref = split.project_ref
        self.stats = RegistryStats()
        self.rest = Rest(timeout, transport, self.stats, self.scrub)
        # ranged reads and uploads: one byte transport, in tests as in production (a test
        # `transport` only carries the JSON requests)
        self.bytes = Transport(timeout, self.scrub)
        self.retrying = Retrying(policy, self.stats, sleep=sleep, clock=clock, refresh=refresh)
        # MLflow is tried once per session; None = not known yet. Job tokens and anonymous
        # callers are always refused there (§6, §7), so do not even ask.
        possible: bool | None = None if token is not None and token_kind == "personal" else False
        self.mlflow: dict[MlflowPart, bool | None] = {"models": possible, "runs": possible}

    async def aclose(self) -> None:
        """Release connections, including those of worker threads still blocked on them."""
        await self.bytes.aclose()
        await self.rest.aclose()

    def project_url(self, tail: str) -> str:
        return f"{self.api_base}/projects/{self.ref}/{tail}"

    def mlflow_url(self, method: str) -> str:
        return self.project_url(f"ml/mlflow/api/2.0/mlflow/{method}")

    def auth_headers(self, route: Route) -> dict[str, str]:
        if self.token is None or route == "storage":
            return {}
        if route in ("ml_models", "graphql"):
            # ml_models reads only the Authorization header; PRIVATE-TOKEN would be ignored
            # and the request treated as anonymous (§7).
            return {"Authorization": f"Bearer {self.token}"}
        if self.token_kind == "job":
            return {"JOB-TOKEN": self.token}
        return {"PRIVATE-TOKEN": self.token}

    def scrub(self, text: str) -> str:
        """Belt and braces: no server echo or library message may carry the token."""
        if self.token and self.token in text:
            text = text.replace(self.token, "[token]")
        return text

    def mlflow_off(self, what: MlflowPart, why: object) -> None:
        log.info("MLflow API unavailable for %s (%s); using the packages API", what, why)
        self.mlflow[what] = False

    async def mlflow_json(
        self,
        kind: str,
        method: str,
        endpoint: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        passthrough: frozenset[int] = frozenset(),
    ) -> Reply:
        """A JSON request to the project's MLflow-compatible API (§6), with retries."""
        url = self.mlflow_url(endpoint)
        return await self.json(
            kind, method, url, route="mlflow", params=params, body=body, passthrough=passthrough
        )

    async def json(
        self,
        kind: str,
        method: str,
        url: str,
        *,
        route: Route = "api",
        params: Mapping[str, str] | None = None,
        body: Any = None,
        passthrough: frozenset[int] = frozenset(),
    ) -> Reply:
        """A JSON request with retries. Statuses in `passthrough` are returned, not raised."""

        async def attempt() -> Reply:
            headers = self.auth_headers(route)  # per attempt: the token may rotate
            return await self.rest.request(kind, method, url, headers, params, body, passthrough)

        return await self.retrying(attempt, f"{method} {where_of(url)}")
