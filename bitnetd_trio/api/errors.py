"""The HTTP layer's error type.

`ApiError` is what a request handler raises for anything the client should see: it carries the
HTTP status and the OpenAI error envelope fields, the way h11's `RemoteProtocolError` carries the
status to answer with.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

__all__ = ["ApiError", "default_error_type"]

# OpenAI error types by HTTP status (http-api §1.4).
_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
}


def default_error_type(status: int) -> str:
    """The OpenAI error `type` for an HTTP status."""
    if status in _TYPE_BY_STATUS:
        return _TYPE_BY_STATUS[status]
    return "server_error" if status >= 500 else "invalid_request_error"


def _clip(text: str, limit: int = 200) -> str:
    """Client-supplied text quoted in a message, cut short: errors also end up in logs."""
    return text if len(text) <= limit else text[:limit] + "..."


class ApiError(Exception):
    """An error answered to the client with `status` and the OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type if type is not None else default_error_type(status)
        self.param = param
        self.code = code
        self.headers = dict(headers) if headers else {}

    def envelope(self) -> dict:
        """`{"error": {"message", "type", "param", "code"}}`."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        """The envelope as a UTF-8 JSON response body."""
        return json.dumps(self.envelope(), ensure_ascii=False).encode("utf-8")

    def __repr__(self) -> str:
        return (
            f"ApiError({self.status}, {self.message!r}, type={self.type!r}, "
            f"param={self.param!r}, code={self.code!r})"
        )

    # Constructors for the errors the router and handlers answer most often.

    @classmethod
    def route_not_found(cls, method: str, path: str) -> ApiError:
        return cls(404, f"no route for {_clip(method)} {_clip(path)}", type="not_found_error")

    @classmethod
    def method_not_allowed(cls, method: str, path: str, allowed: Iterable[str]) -> ApiError:
        allow = ", ".join(sorted(allowed))
        return cls(
            405,
            f"method {_clip(method)} is not allowed for {_clip(path)} (allowed: {allow})",
            headers={"allow": allow},
        )

    @classmethod
    def model_not_found(cls, model: str) -> ApiError:
        return cls(
            404,
            f"the model '{_clip(model)}' does not exist",
            param="model",
            code="model_not_found",
        )

    @classmethod
    def body_too_large(cls, limit: int) -> ApiError:
        return cls(413, f"request body is larger than the limit of {limit} bytes")

    @classmethod
    def unavailable(cls, message: str, retry_after: int = 1) -> ApiError:
        return cls(503, message, headers={"retry-after": str(retry_after)})

    @classmethod
    def invalid_api_key(cls) -> ApiError:
        return cls(
            401,
            "invalid or missing API key (send 'Authorization: Bearer <key>')",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )

    @classmethod
    def http_version_not_supported(cls, version: str) -> ApiError:
        """505 for a request in another HTTP version than 1.x (http-api §0)."""
        message = f"HTTP/{_clip(version)} is not supported: this server speaks HTTP/1.1"
        return cls(505, message, type="invalid_request_error", code="http_version_not_supported")
