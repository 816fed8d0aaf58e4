"""``ctrlupload doctor``: check the configuration, and the provider it names, in plain words.

One line per check, ``ok``, ``FAIL``, ``warn``, ``info`` or ``skip`` first::

    ok    settings: loaded from the environment and .env
    FAIL  BACKEND_SERVCE_TOKEN: unknown setting; did you mean BACKEND_SERVICE_TOKEN?
    ok    backend: http://backend:8080 answered GET /healthz with HTTP 200
    FAIL  service token: the backend refused BACKEND_SERVICE_TOKEN (HTTP 401)

:func:`run_doctor` returns 0 when no line is ``FAIL``, else 1. Nothing is uploaded: the
backend is asked to presign a probe key (no PUT follows), to abort a made-up multipart
upload and to record an empty set, all of which change nothing. The service token and
presigned URLs are never printed.
"""

from __future__ import annotations

import contextlib
import difflib
import email.utils
import json
import os
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from dotenv import dotenv_values
from pydantic import BaseModel

from . import _checksum
from ._errors import StorageConfigError, TransportFailure
from ._redact import redact_url, register_secret
from ._s3 import ObjectStoreError
from ._settings import _ENV_NAMES, ChecksumMode, MultipartMode, Settings, StorageProvider
from ._transport import HttpResult, Transport
from .protocol import (
    CompleteSetRequest,
    CompleteSetResponse,
    MultipartAbortRequest,
    PresignRequest,
    PresignResponse,
    endpoint_missing,
    json_error_detail,
    parse_response,
)

__all__ = [
    "CLOCK_FAIL_S",
    "CLOCK_WARN_S",
    "SETTING_PREFIXES",
    "backend_unused_warning",
    "run_doctor",
    "unknown_settings",
]

#: Environment names ctrlupload reads start with one of these; others are not checked.
SETTING_PREFIXES: Final = ("STORAGE_", "BACKEND_", "VIDEO_")
#: Clock skew against the backend above which doctor warns ...
CLOCK_WARN_S: Final = 60
#: ... and above which it fails: S3 refuses a signature more than 15 minutes off, and
#: presigned URLs often live only a few minutes.
CLOCK_FAIL_S: Final = 300
#: How close an unknown name must be to a known one to count as its misspelling.
_MISSPELT_CUTOFF: Final = 0.8
#: What a backend without an optional call answers.
_NOT_OFFERED: Final = frozenset({404, 405, 501})
_REFUSED: Final = frozenset({401, 403})
_PROBE_BODY_BYTES: Final = 5

_REQUIRED: Final[Mapping[StorageProvider, tuple[str, ...]]] = {
    StorageProvider.LOCAL: (),
    StorageProvider.BACKEND_PRESIGNED: ("BACKEND_BASE_URL", "BACKEND_SERVICE_TOKEN"),
    StorageProvider.S3: ("STORAGE_S3_BUCKET",),
    StorageProvider.MINIO: ("STORAGE_S3_BUCKET", "STORAGE_S3_ENDPOINT_URL"),
}
_FIELD_OF_ALIAS: Final = {
    field.alias: name for name, field in Settings.model_fields.items() if field.alias is not None
}


@dataclass(frozen=True)
class UnknownSetting:
    """An environment name with ctrlupload's prefix that is no setting of ctrlupload.

    Attributes:
        name: The name as found.
        suggestion: The known name it is probably a misspelling of, or None.
        where: ``"environment"`` or ``".env"``.
    """

    name: str
    suggestion: str | None
    where: str


def unknown_settings(
    environ: Mapping[str, str], dotenv_names: Mapping[str, object] | None = None
) -> list[UnknownSetting]:
    """Names starting ``STORAGE_``, ``BACKEND_`` or ``VIDEO_`` that ctrlupload does not know.

    Args:
        environ: The environment.
        dotenv_names: The names a ``.env`` file sets (values are not looked at).

    Returns:
        One entry per unknown name, sorted, with the known name it is closest to when
        that one is close enough to be a typo (case is ignored).
    """
    found: dict[str, str] = {}
    for name in dotenv_names or {}:
        found[name] = ".env"
    for name in environ:
        found[name] = "environment"
    known = sorted(_ENV_NAMES)
    unknown = []
    for name, where in sorted(found.items()):
        if name in _ENV_NAMES or not name.upper().startswith(SETTING_PREFIXES):
            continue
        close = difflib.get_close_matches(name.upper(), known, n=1, cutoff=_MISSPELT_CUTOFF)
        unknown.append(UnknownSetting(name, close[0] if close else None, where))
    return unknown


def backend_unused_warning(settings: Settings) -> str | None:
    """A warning when BACKEND_* variables are set while the provider is ``local``.

    They are then ignored, which usually means ``STORAGE_PROVIDER`` was forgotten.
    """
    if settings.storage_provider is not StorageProvider.LOCAL:
        return None
    names = sorted(
        str(field.alias)
        for name, field in Settings.model_fields.items()
        if name.startswith("backend_") and name in settings.model_fields_set
    )
    if not names:
        return None
    verb = "is" if len(names) == 1 else "are"
    provider = (
        "STORAGE_PROVIDER=local"
        if "storage_provider" in settings.model_fields_set
        else "STORAGE_PROVIDER is local (the default)"
    )
    return (
        f"{' and '.join(names)} {verb} set but {provider}; "
        "set STORAGE_PROVIDER=backend_presigned to use the backend"
    )


class _Report:
    """Writes the lines and counts the failures."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self.failures = 0

    def line(self, status: str, subject: str, detail: str) -> None:
        if status == "FAIL":
            self.failures += 1
        self._out.write(f"{status:<4}  {subject}: {detail}\n")
        self._out.flush()


def run_doctor(
    source: Settings | Mapping[str, str] | None = None,
    out: TextIO | None = None,
    *,
    dotenv_path: str | os.PathLike[str] | None = ".env",
) -> int:
    """Check the configuration and the provider it names; one line per check on ``out``.

    Args:
        source: The environment to read (``os.environ`` by default), or ready
            :class:`Settings` (then the variable names are not checked).
        out: Where the lines go; ``sys.stdout`` by default.
        dotenv_path: The ``.env`` file read beneath the environment, as for
            :meth:`Settings.from_env`; None reads none.

    Returns:
        0 when every check passed (``warn``, ``info`` and ``skip`` lines included), else 1.
    """
    if out is None:
        import sys

        out = sys.stdout
    report = _Report(out)
    settings = _load(source, dotenv_path, report)
    if settings is not None:
        _check_provider(settings, report)
    report.line(
        "ok" if report.failures == 0 else "FAIL",
        "doctor",
        "every check passed"
        if report.failures == 0
        else f"{report.failures} check{'s' if report.failures > 1 else ''} failed",
    )
    return 0 if report.failures == 0 else 1


# -- configuration ---------------------------------------------------------------------


def _load(
    source: Settings | Mapping[str, str] | None,
    dotenv_path: str | os.PathLike[str] | None,
    report: _Report,
) -> Settings | None:
    if isinstance(source, Settings):
        report.line("ok", "settings", "given in code")
        return source
    environ: Mapping[str, str] = os.environ if source is None else source
    dotenv: Mapping[str, object] = {}
    if dotenv_path is not None and Path(dotenv_path).is_file():
        dotenv = dotenv_values(dotenv_path)
    for unknown in unknown_settings(environ, dotenv):
        where = " (in .env)" if unknown.where == ".env" else ""
        if unknown.suggestion is not None:
            report.line(
                "FAIL",
                unknown.name,
                f"unknown setting{where}; did you mean {unknown.suggestion}?",
            )
        else:
            report.line("warn", unknown.name, f"unknown setting{where}; ctrlupload ignores it")
    try:
        settings = Settings.from_env(environ, dotenv_path=dotenv_path)
    except StorageConfigError as exc:
        report.line("FAIL", "settings", str(exc))
        report.line("skip", "provider", "the settings do not load")
        return None
    origin = "the environment and .env" if dotenv else "the environment"
    report.line("ok", "settings", f"loaded from {origin}")
    return settings


def _check_provider(settings: Settings, report: _Report) -> None:
    provider = settings.storage_provider
    chosen = (
        "STORAGE_PROVIDER"
        if "storage_provider" in settings.model_fields_set
        else "the default; STORAGE_PROVIDER is not set"
    )
    report.line("ok", "provider", f"{provider.value} ({chosen})")
    unused = backend_unused_warning(settings)
    if unused is not None:
        report.line("warn", "backend settings", unused)
    if provider is not StorageProvider.LOCAL:
        _check_checksum(settings, report)
    missing = False
    for variable in _REQUIRED[provider]:
        value = getattr(settings, _FIELD_OF_ALIAS[variable])
        if value is None:
            missing = True
            report.line("FAIL", variable, f"not set; STORAGE_PROVIDER={provider.value} needs it")
        elif variable == "BACKEND_SERVICE_TOKEN":
            report.line("ok", variable, "set (not shown)")
        elif variable.endswith("_URL"):
            report.line("ok", variable, redact_url(str(value)))
        else:
            report.line("ok", variable, str(value))
    if missing:
        report.line("skip", provider.value, "a required setting is missing")
    elif provider is StorageProvider.LOCAL:
        _check_local_root(settings.storage_local_root, report)
    elif provider is StorageProvider.BACKEND_PRESIGNED:
        _BackendProbe(settings, report).run()
    else:
        _check_bucket(settings, report)


def _check_checksum(settings: Settings, report: _Report) -> None:
    """Whether uploads can be checked by storage (CRC64NVME) or only by MD5."""
    mode = settings.storage_checksum
    subject = "STORAGE_CHECKSUM"
    if mode in (ChecksumMode.MD5, ChecksumMode.OFF):
        report.line("ok", subject, mode.value)
    elif _checksum.available():
        report.line(
            "ok",
            subject,
            f"{mode.value}: CRC64NVME (awscrt), checked by storage where the backend signs it",
        )
    elif mode is ChecksumMode.CRC64NVME:
        report.line("FAIL", subject, f"crc64nvme needs awscrt: {_checksum.INSTALL_HINT}")
    else:
        report.line(
            "info",
            subject,
            "auto, but awscrt is not installed: uploads check MD5 against the ETag after the "
            f"PUT ({_checksum.INSTALL_HINT} for checksums storage verifies)",
        )


# -- local -----------------------------------------------------------------------------


def _check_local_root(root: Path, report: _Report) -> None:
    subject = "STORAGE_LOCAL_ROOT"
    root = root.absolute()
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        report.line("FAIL", subject, f"{existing} is a file, not a folder")
        return
    try:
        handle, probe = tempfile.mkstemp(prefix=".ctrlupload-doctor-", dir=existing)
    except OSError as exc:
        report.line("FAIL", subject, f"{existing} is not writable: {exc.strerror or exc}")
        return
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(probe)
    if existing == root:
        report.line("ok", subject, f"{root} is writable")
    else:
        report.line(
            "ok", subject, f"{root} does not exist yet; it will be made in {existing} (writable)"
        )


# -- s3 and minio ----------------------------------------------------------------------


def _check_bucket(settings: Settings, report: _Report) -> None:
    """One HeadBucket: the bucket exists, is reachable, and the credentials may see it."""
    from .providers._s3 import bucket_for

    subject = "bucket"
    try:
        bucket = bucket_for(settings, max_attempts=1)
    except StorageConfigError as exc:
        report.line("FAIL", subject, str(exc))
        return
    try:
        bucket.check()
    except ObjectStoreError as exc:
        report.line("FAIL", subject, str(exc).rstrip(".") + _bucket_hint(exc))
        return
    finally:
        bucket.close()
    report.line(
        "ok", subject, f"HeadBucket of '{bucket.bucket}' at {bucket.endpoint_url} succeeded"
    )


def _bucket_hint(error: ObjectStoreError) -> str:
    """What to check, for the failures whose message does not say it already."""
    if error.kind == "no-bucket":
        return "; check STORAGE_S3_BUCKET"
    if error.kind == "access-denied":
        return "; check the credentials' IAM policy and the bucket policy"
    if error.kind == "unreachable":
        return "; check STORAGE_S3_ENDPOINT_URL and the network"
    if error.kind == "wrong-region":
        where = f"STORAGE_S3_REGION={error.bucket_region}" if error.bucket_region else ""
        return f"; set {where or 'STORAGE_S3_REGION'}"
    return ""


# -- backend_presigned -----------------------------------------------------------------


class _BackendProbe:
    """The backend's checks: reachable, token, multipart, complete-set, clock."""

    def __init__(self, settings: Settings, report: _Report) -> None:
        from .providers._backend import transport_for

        assert settings.backend_base_url is not None
        assert settings.backend_service_token is not None
        self._settings = settings
        self._report = report
        self._base = settings.backend_base_url
        self._token = settings.backend_service_token.get_secret_value()
        register_secret(self._token)
        # One attempt per probe: doctor reports what the backend answers, at once.
        self._transport: Transport = transport_for(
            settings.model_copy(update={"storage_retry_attempts": 1})
        )
        self._key = f"videos/ctrlupload-doctor/probe/{uuid.uuid4().hex}/probe.txt"
        self._skew_s: float | None = None

    def run(self) -> None:
        try:
            if not self._reachable():
                return
            if self._token_accepted():
                self._multipart()
                self._complete_set()
            self._clock()
        finally:
            self._transport.close()

    def _send(self, method: str, path: str, payload: BaseModel | None) -> HttpResult:
        """One request; notes the clock skew from the answer's ``Date``."""
        url = self._base + path
        sent_at = time.time()
        if payload is None:
            result = self._transport.send(
                method, url, body=None, headers={"Accept": "application/json"}
            )
        else:
            result = self._transport.post_json(url, payload.model_dump(), token=self._token)
        received_at = time.time()
        if self._skew_s is None:
            date = _parse_date(result.headers.get("date"))
            if date is not None:
                # Date has whole seconds; the answer was made between sending and receipt.
                self._skew_s = (sent_at + received_at) / 2 - date
        return result

    def _reachable(self) -> bool:
        subject = "backend"
        try:
            result = self._send("GET", "/healthz", None)
        except TransportFailure as failure:
            self._report.line("FAIL", subject, f"cannot reach {self._base}: {_plain(failure)}")
            self._report.line("skip", "service token", "the backend is unreachable")
            return False
        if result.status_code == 200:
            self._report.line("ok", subject, f"{self._base} answered GET /healthz with HTTP 200")
        elif result.status_code >= 500:
            self._report.line(
                "warn",
                subject,
                f"{self._base} is reachable, but GET /healthz answered HTTP "
                f"{result.status_code}{json_error_detail(result.body)}",
            )
        else:
            self._report.line(
                "ok",
                subject,
                f"{self._base} is reachable (GET /healthz answered HTTP {result.status_code})",
            )
        return True

    def _post(self, subject: str, path: str, payload: BaseModel) -> HttpResult | None:
        try:
            return self._send("POST", path, payload)
        except TransportFailure as failure:
            self._report.line("FAIL", subject, f"POST {path} failed: {_plain(failure)}")
            return None

    def _token_accepted(self) -> bool:
        subject = "service token"
        path = self._settings.backend_storage_presign_path
        request = PresignRequest(
            object_key=self._key, content_type="text/plain", content_length=_PROBE_BODY_BYTES
        )
        result = self._post(subject, path, request)
        if result is None:
            return False
        status = result.status_code
        if status in _REFUSED:
            self._report.line(
                "FAIL", subject, f"the backend refused BACKEND_SERVICE_TOKEN (HTTP {status})"
            )
            return False
        if status == 200:
            problem = _contract_problem(result.body, PresignResponse)
            if problem is None:
                self._report.line(
                    "ok",
                    subject,
                    f"the backend accepted it (POST {path} presigned a probe key; "
                    "nothing was uploaded)",
                )
            else:
                self._report.line(
                    "FAIL", "presign", f"POST {path}: the answer breaks the contract: {problem}"
                )
            return True
        hint = "; check BACKEND_STORAGE_PRESIGN_PATH" if status in _NOT_OFFERED else ""
        self._report.line(
            "FAIL",
            "presign",
            f"POST {path} answered HTTP {status}{json_error_detail(result.body)}{hint}",
        )
        return True  # the token may be fine; the optional calls still say something

    def _multipart(self) -> None:
        subject = "multipart"
        path = self._settings.backend_storage_multipart_abort_path
        request = MultipartAbortRequest(
            object_key=self._key, upload_id=f"ctrlupload-doctor-{uuid.uuid4().hex}"
        )
        result = self._post(subject, path, request)
        if result is None:
            return
        status = result.status_code
        missing = endpoint_missing(status, result.body)
        if status == 200 or (status == 404 and not missing):
            self._report.line(
                "ok", subject, "offered (large files go up in parts; put --resume works)"
            )
            return
        if missing:
            needed = self._settings.storage_multipart is MultipartMode.ALWAYS
            self._report.line(
                "FAIL" if needed else "info",
                subject,
                f"not offered (POST {path} answered HTTP {status}); "
                + (
                    "STORAGE_MULTIPART=always needs it"
                    if needed
                    else "every file goes up in one PUT, and put --resume cannot work"
                ),
            )
            return
        self._report.line(
            "FAIL", subject, f"POST {path} answered HTTP {status}{json_error_detail(result.body)}"
        )

    def _complete_set(self) -> None:
        subject = "complete-set"
        path = self._settings.backend_storage_complete_set_path
        result = self._post(subject, path, CompleteSetRequest(objects=[]))
        if result is None:
            return
        status = result.status_code
        if status == 200:
            problem = _contract_problem(result.body, CompleteSetResponse)
            if problem is None:
                self._report.line("ok", subject, "offered (a render is recorded in one call)")
            else:
                self._report.line(
                    "FAIL", subject, f"POST {path}: the answer breaks the contract: {problem}"
                )
            return
        if endpoint_missing(status, result.body):
            self._report.line(
                "info",
                subject,
                f"not offered (POST {path} answered HTTP {status}); a render's assets are "
                "recorded one complete call each",
            )
            return
        self._report.line(
            "FAIL",
            subject,
            f"POST {path} answered HTTP {status}{json_error_detail(result.body)}; an empty "
            'set ({"objects": []}) should answer 200',
        )

    def _clock(self) -> None:
        subject = "clock"
        if self._skew_s is None:
            self._report.line("skip", subject, "the backend's answers carry no Date header")
            return
        skew = round(self._skew_s)
        if skew == 0:
            self._report.line("ok", subject, "agrees with the backend's (skew 0 s)")
            return
        direction = "ahead of" if skew > 0 else "behind"
        text = f"this machine's clock is {abs(skew)} s {direction} the backend's"
        if abs(skew) > CLOCK_FAIL_S:
            self._report.line(
                "FAIL",
                subject,
                f"{text}: over {CLOCK_FAIL_S // 60} minutes, presigned URLs may be "
                "refused as expired; set the clock (NTP)",
            )
        elif abs(skew) > CLOCK_WARN_S:
            self._report.line(
                "warn", subject, f"{text}; presigned URLs expire early or late: set the clock (NTP)"
            )
        else:
            self._report.line("ok", subject, text)


def _parse_date(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None


def _contract_problem(
    body: bytes, model: type[PresignResponse | CompleteSetResponse]
) -> str | None:
    try:
        payload: Any = json.loads(body)
    except ValueError:
        return "the answer is not JSON"
    parsed, problem = parse_response(model, payload)
    return None if parsed is not None else problem


#: Plain words for what went wrong below HTTP, by a telling piece of the failure's text.
_PLAIN_REASONS: Final = (
    ("connection refused", "connection refused"),
    ("name or service not known", "the host name does not resolve"),
    ("nodename nor servname", "the host name does not resolve"),
    ("temporary failure in name resolution", "the host name does not resolve"),
    ("no address associated", "the host name does not resolve"),
    ("getaddrinfo failed", "the host name does not resolve"),
    ("connection reset", "connection reset"),
    ("network is unreachable", "network is unreachable"),
    ("no route to host", "no route to host"),
    ("certificate verify failed", "the TLS certificate is not trusted"),
)


def _plain(failure: TransportFailure) -> str:
    """The reason a request failed, in a few words."""
    text = str(failure.args[0]) if failure.args else str(failure)
    lowered = text.lower()
    for marker, reason in _PLAIN_REASONS:
        if marker in lowered:
            return reason
    if lowered.startswith("timed out"):
        return "timed out"
    return text
