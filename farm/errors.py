"""Domain errors with the HTTP meaning the API gives them (rendered as OpenAI error bodies by `api.errors`)."""

from __future__ import annotations


class FarmError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = headers or {}
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type


class InvalidRequest(FarmError):
    status = 400


class Unauthenticated(FarmError):
    status = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDenied(FarmError):
    status = 403
    type = "permission_error"
    code = "permission_denied"


class NotFound(FarmError):
    status = 404
    type = "not_found_error"


class ModelNotFound(NotFound):
    type = "invalid_request_error"
    code = "model_not_found"


class Conflict(FarmError):
    status = 409
    type = "conflict_error"


class Unavailable(FarmError):
    status = 503
    type = "service_unavailable"
    code = "no_capacity"


class Timeout(FarmError):
    status = 504
    type = "timeout_error"
    code = "deadline_exceeded"


class ModelOverloaded(FarmError):
    """Every replica of the model is busy and its queue is over the bound (farm.routing.model_overloaded)."""

    status = 429
    type = "rate_limit_error"
    code = "model_overloaded"
