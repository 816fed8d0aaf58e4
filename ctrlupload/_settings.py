"""Settings: the seed's environment variables plus the client's own STORAGE_* knobs.

Loading has no side effects: ``.env`` is read with ``dotenv_values`` and never written
into ``os.environ``, and the real environment wins over the file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
)

from ._errors import StorageConfigError
from .protocol._parts import (
    DEFAULT_MULTIPART_THRESHOLD_BYTES,
    DEFAULT_PART_BYTES,
    MAX_PART_BYTES,
    MIN_PART_BYTES,
)

__all__ = [
    "DEFAULT_SEND_BLOCK_BYTES",
    "ChecksumMode",
    "MultipartMode",
    "Settings",
    "StorageProvider",
]

MIB: Final = 1024 * 1024
DEFAULT_MAX_UPLOAD_BYTES: Final = 104_857_600
DEFAULT_SEND_BLOCK_BYTES: Final = 1 * MIB
DEFAULT_RETRY_ATTEMPTS: Final = 5
DEFAULT_MAX_CONNECTIONS: Final = 32
_BUCKET_NAME: Final = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class StorageProvider(StrEnum):
    """Where uploads go; the value of ``STORAGE_PROVIDER``."""

    LOCAL = "local"
    S3 = "s3"
    MINIO = "minio"
    BACKEND_PRESIGNED = "backend_presigned"


class MultipartMode(StrEnum):
    """When to use multipart uploads; the value of ``STORAGE_MULTIPART``."""

    AUTO = "auto"
    ALWAYS = "always"
    NEVER = "never"


class ChecksumMode(StrEnum):
    """How uploads are checked; the value of ``STORAGE_CHECKSUM``.

    ``auto``: a CRC64NVME that storage verifies before it stores the body, where the
    backend signs one and awscrt is installed (``ctrlupload[checksum]``); otherwise
    the MD5 of the bytes sent against storage's ETag, after the PUT. ``crc64nvme``:
    the CRC or a clear error, before any byte is sent. ``md5``: the ETag check only.
    ``off``: neither.
    """

    AUTO = "auto"
    CRC64NVME = "crc64nvme"
    MD5 = "md5"
    OFF = "off"


class Settings(BaseModel):
    """Configuration, one field per environment variable.

    Build it in code with the field names (``Settings(storage_provider="local")``) or
    with the environment names (``Settings(STORAGE_PROVIDER="local")``), or load it with
    :meth:`from_env`. Instances are immutable and safe to share between threads.
    The service token is a ``SecretStr``: it never shows in a repr.
    """

    model_config = ConfigDict(frozen=True, populate_by_name=True, extra="forbid")

    storage_provider: StorageProvider = Field(
        StorageProvider.LOCAL,
        alias="STORAGE_PROVIDER",
        description="Which provider get_storage_provider() builds.",
    )
    backend_base_url: str | None = Field(
        None,
        alias="BACKEND_BASE_URL",
        description="Base URL of the backend that issues presigned URLs.",
    )
    backend_service_token: SecretStr | None = Field(
        None,
        alias="BACKEND_SERVICE_TOKEN",
        description="Bearer token for the backend's internal API; sent to no other origin.",
    )
    backend_storage_presign_path: str = Field(
        "/internal/storage/presign-put", alias="BACKEND_STORAGE_PRESIGN_PATH"
    )
    backend_storage_complete_path: str = Field(
        "/internal/storage/complete", alias="BACKEND_STORAGE_COMPLETE_PATH"
    )
    backend_storage_delete_path: str = Field(
        "/internal/storage/delete", alias="BACKEND_STORAGE_DELETE_PATH"
    )
    backend_storage_complete_set_path: str = Field(
        "/internal/storage/complete-set",
        alias="BACKEND_STORAGE_COMPLETE_SET_PATH",
        description="Records a render's objects in one call; optional, see docs/contract.md.",
    )
    backend_storage_multipart_initiate_path: str = Field(
        "/internal/storage/multipart/initiate", alias="BACKEND_STORAGE_MULTIPART_INITIATE_PATH"
    )
    backend_storage_multipart_presign_path: str = Field(
        "/internal/storage/multipart/presign-parts",
        alias="BACKEND_STORAGE_MULTIPART_PRESIGN_PATH",
    )
    backend_storage_multipart_list_path: str = Field(
        "/internal/storage/multipart/list-parts", alias="BACKEND_STORAGE_MULTIPART_LIST_PATH"
    )
    backend_storage_multipart_complete_path: str = Field(
        "/internal/storage/multipart/complete", alias="BACKEND_STORAGE_MULTIPART_COMPLETE_PATH"
    )
    backend_storage_multipart_abort_path: str = Field(
        "/internal/storage/multipart/abort", alias="BACKEND_STORAGE_MULTIPART_ABORT_PATH"
    )
    video_max_upload_bytes: int = Field(
        DEFAULT_MAX_UPLOAD_BYTES,
        alias="VIDEO_MAX_UPLOAD_BYTES",
        ge=0,
        description="Largest body accepted, checked before any network call.",
    )
    storage_public_base_url: str | None = Field(
        None,
        alias="STORAGE_PUBLIC_BASE_URL",
        description="get_url(key) returns this + '/' + key when set.",
    )
    storage_s3_bucket: str | None = Field(
        None,
        alias="STORAGE_S3_BUCKET",
        description="The bucket of the s3 and minio providers.",
    )
    storage_s3_region: str | None = Field(
        None,
        alias="STORAGE_S3_REGION",
        pattern=r"^[a-z0-9][a-z0-9-]{0,39}$",
        description=(
            "Signing region of the s3 and minio providers; unset, boto3's chain decides "
            "(AWS_REGION, the profile), and minio uses us-east-1."
        ),
    )
    storage_s3_endpoint_url: str | None = Field(
        None,
        alias="STORAGE_S3_ENDPOINT_URL",
        description=(
            "An S3-compatible endpoint (required for minio); unset, AWS. A custom "
            "endpoint gets path-style addressing."
        ),
    )
    storage_local_root: Path = Field(
        Path("storage"),
        alias="STORAGE_LOCAL_ROOT",
        description="Root directory of the local provider.",
    )
    storage_connect_timeout_s: float = Field(10.0, alias="STORAGE_CONNECT_TIMEOUT_S", gt=0)
    storage_read_timeout_s: float = Field(120.0, alias="STORAGE_READ_TIMEOUT_S", gt=0)
    storage_min_send_rate_bytes_s: int = Field(
        64 * 1024,
        alias="STORAGE_MIN_SEND_RATE_BYTES_S",
        ge=1,
        description=(
            "Slowest average rate a body may be sent at: one attempt may take at most "
            "connect timeout + read timeout + body bytes / this rate."
        ),
    )
    storage_retry_attempts: int = Field(
        DEFAULT_RETRY_ATTEMPTS,
        alias="STORAGE_RETRY_ATTEMPTS",
        ge=1,
        le=100,
        description="Attempts per HTTP request, the first included.",
    )
    storage_retry_backoff_s: float = Field(
        0.5,
        alias="STORAGE_RETRY_BACKOFF_S",
        ge=0,
        description="Backoff factor: waits are factor * 2**(retry - 1) seconds.",
    )
    storage_retry_backoff_max_s: float = Field(
        20.0,
        alias="STORAGE_RETRY_BACKOFF_MAX_S",
        ge=0,
        description="Longest wait between attempts, Retry-After included.",
    )
    storage_send_block_bytes: int = Field(
        DEFAULT_SEND_BLOCK_BYTES,
        alias="STORAGE_SEND_BLOCK_BYTES",
        ge=4096,
        le=16 * MIB,
        description="Bytes read from the file and handed to the socket at a time.",
    )
    storage_max_connections: int = Field(
        DEFAULT_MAX_CONNECTIONS,
        alias="STORAGE_MAX_CONNECTIONS",
        ge=1,
        le=1024,
        description="Kept-alive connections per host; set it to at least your thread count.",
    )
    storage_multipart: MultipartMode = Field(
        MultipartMode.AUTO,
        alias="STORAGE_MULTIPART",
        description="auto: multipart when the backend offers it; always; never.",
    )
    storage_multipart_threshold_bytes: int = Field(
        DEFAULT_MULTIPART_THRESHOLD_BYTES,
        alias="STORAGE_MULTIPART_THRESHOLD_BYTES",
        ge=MIN_PART_BYTES,
        description="Files at least this large go multipart (in auto and always modes).",
    )
    storage_multipart_part_bytes: int = Field(
        DEFAULT_PART_BYTES,
        alias="STORAGE_MULTIPART_PART_BYTES",
        ge=MIN_PART_BYTES,
        le=MAX_PART_BYTES,
        description="Preferred part size; grown so a file needs at most 10,000 parts.",
    )
    storage_multipart_concurrency: int = Field(
        4,
        alias="STORAGE_MULTIPART_CONCURRENCY",
        ge=1,
        le=64,
        description="Parts of one file sent at once.",
    )
    storage_resume_dir: Path | None = Field(
        None,
        alias="STORAGE_RESUME_DIR",
        description="Checkpoints of resumable uploads; ~/.cache/ctrlupload/resume if unset.",
    )
    storage_checksum: ChecksumMode = Field(
        ChecksumMode.AUTO,
        alias="STORAGE_CHECKSUM",
        description=(
            "auto: CRC64NVME checked by storage where the backend signs it, else MD5 vs "
            "ETag; crc64nvme; md5; off."
        ),
    )
    storage_verify_md5: bool = Field(
        True,
        alias="STORAGE_VERIFY_MD5",
        description=(
            "Check a plain-MD5 ETag against the MD5 of the bytes sent (the md5 check, "
            "and auto's fallback); false turns it off."
        ),
    )

    @field_validator("backend_base_url", "storage_public_base_url", "storage_s3_endpoint_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError("must be an http:// or https:// URL")
        if parts.query or parts.fragment:
            raise ValueError("must not have a query string or fragment")
        return value.rstrip("/")

    @field_validator(
        "backend_storage_presign_path",
        "backend_storage_complete_path",
        "backend_storage_delete_path",
        "backend_storage_complete_set_path",
        "backend_storage_multipart_initiate_path",
        "backend_storage_multipart_presign_path",
        "backend_storage_multipart_list_path",
        "backend_storage_multipart_complete_path",
        "backend_storage_multipart_abort_path",
    )
    @classmethod
    def _api_path(cls, value: str) -> str:
        if not value.startswith("/") or "?" in value or "#" in value:
            raise ValueError("must be a path starting with '/'")
        return value

    @field_validator("storage_s3_bucket", "storage_s3_region", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("storage_s3_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        if value is not None and not _BUCKET_NAME.fullmatch(value):
            raise ValueError(
                "must be an S3 bucket name: 3 to 63 lower-case letters, digits, dots and "
                "hyphens, starting and ending with a letter or digit"
            )
        return value

    @field_validator("backend_service_token")
    @classmethod
    def _token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None or value.get_secret_value() == "":
            return None
        if any(char.isspace() for char in value.get_secret_value()):
            raise ValueError("must not contain whitespace")
        return value

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv_path: str | os.PathLike[str] | None = ".env",
    ) -> Settings:
        """Load settings from the environment and a ``.env`` file.

        Args:
            environ: Variables to read; defaults to ``os.environ``.
            dotenv_path: A dotenv file read beneath ``environ`` (the environment wins),
                ``.env`` in the working directory by default; ``None`` skips it. A
                missing file is not an error.

        Returns:
            The loaded settings.

        Raises:
            StorageConfigError: A variable has a bad value; the message names it, says
                where its value came from (``from the environment`` or ``from .env at
                /abs/path/.env``) and never repeats a secret.
        """
        source = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        origins: dict[str, str] = {}
        if dotenv_path is not None and Path(dotenv_path).is_file():
            from_file = f"from .env at {Path(dotenv_path).absolute()}"
            for name, value in dotenv_values(dotenv_path).items():
                if name in _ENV_NAMES and value is not None:
                    values[name] = value
                    origins[name] = from_file
        for name in _ENV_NAMES:
            if name in source:
                values[name] = source[name]
                origins[name] = "from the environment"
        return cls._from_values(values, origins)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> Settings:
        """Validate a mapping of environment names to values.

        Args:
            values: For example ``{"STORAGE_PROVIDER": "local"}``.

        Returns:
            The settings.

        Raises:
            StorageConfigError: A value is invalid or a name is unknown.
        """
        return cls._from_values(values, {})

    @classmethod
    def _from_values(cls, values: Mapping[str, Any], origins: Mapping[str, str]) -> Settings:
        """Validate ``values``; a failure names the variable and, from ``origins``,
        where its value came from ("from the environment")."""
        try:
            return cls.model_validate(dict(values))
        except ValidationError as exc:
            errors = exc.errors(include_input=False, include_url=False)
        variable = ".".join(str(part) for part in errors[0]["loc"]) or None
        origin = origins.get(variable or "")
        where = f" ({origin})" if origin else ""
        name = f"setting {variable}" if variable else "settings"
        message = f"Invalid {name}{where}: {errors[0]['msg']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problems)"
        # Raised outside the except block: the pydantic error quotes the input, which
        # may be the token, so it is neither the cause nor the context.
        raise StorageConfigError(message, variable=variable)


_ENV_NAMES: Final = frozenset(
    field.alias for field in Settings.model_fields.values() if field.alias is not None
)
