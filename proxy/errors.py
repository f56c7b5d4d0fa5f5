"""The one error tree of PaySentry.

    PaySentryError                 code, message, http status; what a caller can be shown
    ├── ConfigError                the settings file or environment is wrong (every problem listed)
    ├── PolicyError                a policy set failed to load (every problem listed)
    ├── BadRequest                 the agent's request is malformed (400, names the parameter)
    │   ├── WebhookRejected        an inbound webhook without a valid, fresh signature (400)
    │   ├── RequestTimeout         the client sent its body too slowly (408)
    │   └── RequestRefused         the HTTP server refused the request: too large, bad framing (413, 400)
    ├── RouteNotFound              no such path behind this provider (404)
    ├── MethodNotAllowed           CONNECT, TRACE, PUT ... (405)
    ├── AuthenticationFailed       missing, unknown, revoked or wrong token (401)
    ├── RateLimited                too many attempts (429)
    ├── IdempotencyMismatch        same Idempotency-Key, different request (400, idempotency_error)
    ├── RequestInFlight            same Idempotency-Key is being processed now (409, retryable)
    ├── NotFound                   an owner-API object that does not exist or is not yours (404)
    ├── Forbidden                  not allowed to act on it (an approver not named on a hold) (403)
    ├── Conflict                   an owner action that does not fit the object's state (409)
    ├── StoreUnavailable           the store cannot be reached: payments fail closed (503)
    └── UpstreamUnavailable        the provider could not be reached (502)

Library errors are mapped with ``raise OurError(...) from exc`` at the edge that calls the library.
Messages never contain a secret: tokens, keys and credentials are never formatted into them, and card
numbers a caller sent (``Invalid integer: '4242...'``) are masked when the error is made.
"""

from __future__ import annotations

from proxy.redact import mask_cards


class PaySentryError(Exception):
    status = 500
    code = "paysentry_error"

    def __init__(self, message: str, *, code: str | None = None, param: str | None = None) -> None:
        message = mask_cards(message)  # a message may echo what the caller sent: never a card number
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        self.param = mask_cards(param) if param else param


class ConfigError(PaySentryError):
    code = "invalid_config"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid configuration:\n  " + "\n  ".join(problems))


class PolicyError(PaySentryError):
    code = "invalid_policy"

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid policy set:\n  " + "\n  ".join(problems))


class BadRequest(PaySentryError):
    status = 400
    code = "parameter_invalid"


class WebhookRejected(BadRequest):
    code = "webhook_rejected"


class RequestTimeout(BadRequest):
    status = 408
    code = "request_timeout"


class RequestRefused(BadRequest):
    """The HTTP server refused the request itself (a body too large, bad framing): its own status."""

    code = "request_refused"

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class RouteNotFound(PaySentryError):
    status = 404
    code = "resource_missing"


class MethodNotAllowed(PaySentryError):
    status = 405
    code = "method_not_allowed"


class AuthenticationFailed(PaySentryError):
    status = 401
    code = "invalid_api_key"


class RateLimited(PaySentryError):
    status = 429
    code = "rate_limit"


class IdempotencyMismatch(PaySentryError):
    status = 400
    code = "idempotency_key_in_use"


class RequestInFlight(PaySentryError):
    status = 409
    code = "idempotency_key_in_use"


class ObjectBeingResolved(PaySentryError):
    """A call on an object whose making call's outcome PaySentry is still learning (Stripe's word for an
    object another request holds: retry shortly)."""

    status = 409
    code = "lock_timeout"


class NotFound(PaySentryError):
    status = 404
    code = "not_found"


class Forbidden(PaySentryError):
    status = 403
    code = "forbidden"


class Conflict(PaySentryError):
    status = 409
    code = "conflict"


class StoreUnavailable(PaySentryError):
    status = 503
    code = "paysentry_store_unavailable"


class UpstreamUnavailable(PaySentryError):
    """``maybe_sent``: the request may have reached the provider (a timeout, a connection lost after
    sending), so whether money moved is unknown; False when it certainly did not (never connected)."""

    status = 502
    code = "paysentry_upstream_unavailable"

    def __init__(self, message: str, *, maybe_sent: bool = True) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent
