"""The owner API from the command line (``paysentry --api URL``): JSON over urllib with the owner's token.

One seam, ``send(method, url, body, headers) -> (status, body bytes)``, so a test can answer without a
socket. A refusal becomes :class:`ApiRefused` (the API's status, code, message and param); an API that
cannot be reached becomes :class:`ApiUnreachable`.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlencode

from proxy.errors import PaySentryError

Send = Callable[[str, str, bytes | None, Mapping[str, str]], tuple[int, bytes]]


class ApiRefused(PaySentryError):
    """The owner API answered 4xx or 5xx."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, code=code, param=param)
        self.status = status


class ApiUnreachable(PaySentryError):
    """No answer from the owner API (connection refused, DNS, timeout)."""


def urllib_send(method: str, url: str, body: bytes | None, headers: Mapping[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=body, method=method, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - the owner's own URL
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ApiUnreachable(f"cannot reach the owner API at {url.split('/v1/')[0]}: {reason}") from exc


class OwnerApiClient:
    def __init__(self, base_url: str, token: str, send: Send = urllib_send) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise PaySentryError(f"--api takes the owner API's URL (http://host:8081), got {base_url!r}")
        if not token:
            raise PaySentryError(
                "--api needs the owner's token in PAYSENTRY_OWNER_TOKEN (or an approver's psa_)"
            )
        self.base, self.token, self.send = base_url.rstrip("/"), token, send

    def call(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        query: Mapping[str, Any] | None = None,
    ) -> Any:
        url = (
            self.base
            + quote(path)
            + ("?" + urlencode({k: v for k, v in (query or {}).items() if v is not None}) if query else "")
        )
        headers = {"Authorization": f"Bearer {self.token}", "Accept": "application/json"}
        data = None
        if body is not None:
            data, headers["Content-Type"] = json.dumps(body).encode(), "application/json"
        status, raw = self.send(method, url, data, headers)
        try:
            answer = json.loads(raw) if raw else {}
        except ValueError:
            answer = {}
        if status >= 400:
            error = answer.get("error", {}) if isinstance(answer, dict) else {}
            message = error.get("message") or f"the owner API answered {status}"
            raise ApiRefused(status, str(error.get("code", "http_error")), str(message), error.get("param"))
        return answer

    def list(self, path: str, **query: Any) -> list[Any]:
        """Every object of a list, page after page (``starting_after`` while ``has_more``)."""
        out: list[Any] = []
        cursor = None
        while True:
            page = self.call("GET", path, query={**query, "limit": 1000, "starting_after": cursor})
            out += page.get("data", [])
            if not page.get("has_more") or not page.get("data"):
                return out
            cursor = page["data"][-1].get("id") or page["data"][-1].get("seq")
