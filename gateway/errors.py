"""Every error the gateway returns, as one hierarchy rendered in OpenAI's error envelope.

The envelope is ``{"error": {"message", "type", "param", "code"}}``
(https://platform.openai.com/docs/guides/error-codes). The status code decides which exception
class the OpenAI SDKs raise and whether they retry (408, 409, 429 and 5xx are retried).
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping
from datetime import UTC

import orjson


class GatewayError(Exception):
    """An error with an HTTP status that the client sees as an OpenAI error envelope."""

    status = 500
    type = "server_error"
    code: str | None = "internal_error"
    # Whether trying again (later, or at another deployment) may succeed.
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def may_fall_back(self) -> bool:
        """Whether another deployment may serve the request this one failed."""
        return self.retryable or self.status >= 500

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return orjson.dumps(self.envelope())


class InvalidRequest(GatewayError):
    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class InvalidAPIKey(GatewayError):
    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class Forbidden(GatewayError):
    status = 403
    type = "permission_error"
    code = "forbidden"


class NotFound(GatewayError):
    status = 404
    type = "invalid_request_error"
    code = "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class RequestTimeout(GatewayError):
    status = 408
    type = "invalid_request_error"
    code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


class RateLimited(GatewayError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"
    retryable = True


class QuotaExceeded(GatewayError):
    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class UpstreamError(GatewayError):
    """The upstream failed or answered with a server error."""

    status = 502
    type = "server_error"
    code = "upstream_error"
    retryable = True


class ServiceUnavailable(GatewayError):
    status = 503
    type = "server_error"
    code = "service_unavailable"
    retryable = True


class UpstreamTimeout(GatewayError):
    status = 504
    type = "server_error"
    code = "upstream_timeout"
    retryable = True


# An upstream error status is passed to the client unchanged when the OpenAI SDKs know it;
# anything else becomes a 502 so that clients never see an undocumented status.
_PASSED_THROUGH = frozenset({400, 401, 403, 404, 409, 413, 422, 429, 500, 502, 503, 504})

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def from_upstream(
    status: int,
    message: str,
    *,
    provider: str,
    type_: str | None = None,
    code: str | None = None,
    param: str | None = None,
    retry_after: str | None = None,
) -> GatewayError:
    """An error built from an upstream's error response.

    The upstream's own 401/403 means *our* provider credentials are wrong, which is the
    operator's problem, not the client's: the client gets a 502 that says so, never a hint
    that its own key was refused.
    """
    if status in (401, 403):
        err: GatewayError = UpstreamError(
            f"provider '{provider}' rejected the gateway's credentials (HTTP {status})",
            code="upstream_auth_failed",
        )
        err.retryable = False  # another try will not fix the operator's key
        return err
    retry_after = _whole_seconds(retry_after, status)
    if status == 529:  # Anthropic: overloaded
        status = 503
    if status >= 500:
        cls: type[GatewayError] = {503: ServiceUnavailable, 504: UpstreamTimeout}.get(
            status, UpstreamError
        )
        err = cls(message or f"provider '{provider}' failed (HTTP {status})", code=code)
        err.retryable = True
        if status not in _PASSED_THROUGH or status == 500:
            err.status = 502
        if retry_after:
            err.headers["Retry-After"] = retry_after
        return err
    if status not in _PASSED_THROUGH:
        status = 400
    err = GatewayError(message or f"provider '{provider}' refused the request", param=param)
    err.status = status
    err.type = type_ or _TYPE_BY_STATUS.get(status, "invalid_request_error")
    if code is None and status == 429:
        # the code the gateway's own 429 of that kind carries: a quota is not a rate limit
        code = "insufficient_quota" if err.type == "insufficient_quota" else "rate_limit_exceeded"
    err.code = code
    err.retryable = status in (408, 409, 429)
    if retry_after:
        err.headers["Retry-After"] = retry_after
    return err


def _whole_seconds(retry_after: str | None, status: int) -> str | None:
    """An upstream's Retry-After as whole seconds, at least 1, as the gateway's own 429s give
    it; a 429 that gave none gets 1, so that every 429 says when to try again."""
    seconds = retry_after_seconds(retry_after)
    if seconds is None:
        return "1" if status == 429 else None
    return str(max(1, math.ceil(seconds)))


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After value: delta seconds, or an HTTP date (RFC 9110
    section 10.2.3) counted from `now` (the wall clock); a time in the past, or a negative
    delay, means at once. None when there is none, or it is neither.

    The one reader of Retry-After: an upstream's is read here when its error is built, and
    the retry loop reads back the whole seconds that this left on the error."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000": UTC as RFC 5322 says, not local time
            when = when.replace(tzinfo=UTC)
        seconds = when.timestamp() - (time.time() if now is None else now)
    return max(0.0, seconds) if math.isfinite(seconds) else None
