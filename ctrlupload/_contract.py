"""The backend's internal storage API (seed §3): request and response JSON models.

No network here: these models build request bodies and check what came back, so the
protocol can be tested without a server. Upload URLs and signed headers are
credentials and are left out of every repr.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

__all__ = [
    "CompleteRequest",
    "DeleteRequest",
    "PresignRequest",
    "PresignResponse",
    "StatusResponse",
    "parse_response",
]


def _integral_number(value: Any) -> Any:
    # JSON Schema counts 5.0 as an integer; JSON decoders hand it over as a float.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: A JSON integer: 5 or 5.0, but not true, "5" or 5.5 (even under strict validation).
JsonInt = Annotated[int, BeforeValidator(_integral_number)]


class _Request(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _Response(BaseModel):
    # Backends may add fields; the contract only fixes the ones named here.
    model_config = ConfigDict(frozen=True, extra="ignore")


class PresignRequest(_Request):
    """Body of ``POST presign-put`` (seed §3.1)."""

    object_key: str
    content_type: str = Field(min_length=1)
    content_length: JsonInt = Field(ge=0)


class PresignResponse(_Response):
    """Answer of ``POST presign-put`` (seed §3.1)."""

    upload_url: str = Field(repr=False)
    public_url: str
    headers: dict[str, str] = Field(default_factory=dict, repr=False)
    expires_sec: int | None = None

    @field_validator("upload_url")
    @classmethod
    def _http_upload_url(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Only the scheme is quoted: the rest of the URL is a credential.
            raise ValueError(
                f"upload_url must be an http(s) URL, got scheme {parts.scheme or 'none'!r}"
            )
        return value

    @field_validator("headers", mode="before")
    @classmethod
    def _null_headers(cls, value: Any) -> Any:
        return {} if value is None else value


class CompleteRequest(_Request):
    """Body of ``POST complete`` (seed §3.2); an upsert by object_key."""

    object_key: str
    etag: str
    size_bytes: JsonInt = Field(ge=0)
    content_type: str
    public_url: str


class DeleteRequest(_Request):
    """Body of ``POST delete`` (seed §3.3)."""

    object_key: str


class StatusResponse(_Response):
    """Answer of ``complete`` and ``delete``: ``{"status": "ok"}``."""

    status: str


ResponseT = TypeVar("ResponseT", bound=_Response)


def parse_response(model: type[ResponseT], payload: Any) -> tuple[ResponseT | None, str]:
    """Validate a decoded JSON answer against ``model``.

    Returns:
        ``(instance, "")`` when it fits, else ``(None, reason)`` where reason names the
        first missing or bad field without quoting its value.
    """
    if not isinstance(payload, dict):
        return None, f"response is JSON but not an object ({type(payload).__name__})"
    try:
        return model.model_validate(payload), ""
    except ValidationError as exc:
        error = exc.errors(include_input=False, include_url=False)[0]
        field = ".".join(str(part) for part in error["loc"]) or "body"
        if error["type"] == "missing":
            return None, f"response is missing '{field}'"
        return None, f"response field '{field}' is invalid: {error['msg']}"
