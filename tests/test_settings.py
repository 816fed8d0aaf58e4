"""Settings: the seed's variables and defaults, .env loading without side effects."""

import os
from pathlib import Path

import pytest

from ctrlupload import Settings, StorageConfigError, StorageProvider


def test_defaults_are_the_seeds() -> None:
    settings = Settings.from_env({}, dotenv_path=None)
    assert settings.storage_provider is StorageProvider.LOCAL
    assert settings.backend_base_url is None
    assert settings.backend_service_token is None
    assert settings.backend_storage_presign_path == "/internal/storage/presign-put"
    assert settings.backend_storage_complete_path == "/internal/storage/complete"
    assert settings.backend_storage_delete_path == "/internal/storage/delete"
    assert settings.video_max_upload_bytes == 104857600
    assert settings.storage_public_base_url is None


def test_environment_names_are_read() -> None:
    settings = Settings.from_env(
        {
            "STORAGE_PROVIDER": "backend_presigned",
            "BACKEND_BASE_URL": "http://backend:8080/",
            "BACKEND_SERVICE_TOKEN": "tok-123456",
            "VIDEO_MAX_UPLOAD_BYTES": "2048",
            "STORAGE_PUBLIC_BASE_URL": "https://cdn.example.com",
            "STORAGE_RETRY_ATTEMPTS": "7",
            "STORAGE_VERIFY_MD5": "false",
            "UNRELATED": "ignored",
        },
        dotenv_path=None,
    )
    assert settings.storage_provider is StorageProvider.BACKEND_PRESIGNED
    assert settings.backend_base_url == "http://backend:8080"
    assert settings.backend_service_token is not None
    assert settings.backend_service_token.get_secret_value() == "tok-123456"
    assert settings.video_max_upload_bytes == 2048
    assert settings.storage_retry_attempts == 7
    assert settings.storage_verify_md5 is False


def test_dotenv_is_read_beneath_the_environment_without_writing_it(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "STORAGE_PROVIDER=backend_presigned\n"
        "BACKEND_BASE_URL=http://from-file:1\n"
        "VIDEO_MAX_UPLOAD_BYTES=10\n"
    )
    settings = Settings.from_env({"VIDEO_MAX_UPLOAD_BYTES": "20"}, dotenv_path=dotenv)
    assert settings.storage_provider is StorageProvider.BACKEND_PRESIGNED
    assert settings.backend_base_url == "http://from-file:1"
    assert settings.video_max_upload_bytes == 20  # the environment wins
    assert "BACKEND_BASE_URL" not in os.environ or os.environ["BACKEND_BASE_URL"] != (
        "http://from-file:1"
    )


def test_dotenv_in_working_directory_is_the_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("STORAGE_LOCAL_ROOT=/srv/renders\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STORAGE_LOCAL_ROOT", raising=False)
    assert Settings.from_env().storage_local_root == Path("/srv/renders")
    assert "STORAGE_LOCAL_ROOT" not in os.environ


def test_missing_dotenv_is_not_an_error(tmp_path: Path) -> None:
    settings = Settings.from_env({}, dotenv_path=tmp_path / "absent.env")
    assert settings.storage_provider is StorageProvider.LOCAL


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("STORAGE_PROVIDER", "ftp", "STORAGE_PROVIDER"),
        ("VIDEO_MAX_UPLOAD_BYTES", "lots", "VIDEO_MAX_UPLOAD_BYTES"),
        ("VIDEO_MAX_UPLOAD_BYTES", "-1", "VIDEO_MAX_UPLOAD_BYTES"),
        ("BACKEND_BASE_URL", "backend:8080", "http:// or https://"),
        ("BACKEND_BASE_URL", "http://b/?x=1", "query string"),
        ("BACKEND_STORAGE_PRESIGN_PATH", "internal/presign", "starting with '/'"),
        ("STORAGE_RETRY_ATTEMPTS", "0", "STORAGE_RETRY_ATTEMPTS"),
        ("STORAGE_SEND_BLOCK_BYTES", "10", "STORAGE_SEND_BLOCK_BYTES"),
        ("STORAGE_READ_TIMEOUT_S", "0", "STORAGE_READ_TIMEOUT_S"),
        ("STORAGE_MIN_SEND_RATE_BYTES_S", "0", "STORAGE_MIN_SEND_RATE_BYTES_S"),
    ],
)
def test_bad_values_fail_at_load_naming_the_variable(name: str, value: str, fragment: str) -> None:
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_env({name: value}, dotenv_path=None)
    assert caught.value.variable == name
    assert fragment in str(caught.value)


def test_a_bad_token_is_reported_without_echoing_it() -> None:
    secret = "super secret-token"  # whitespace makes it invalid
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_env({"BACKEND_SERVICE_TOKEN": secret}, dotenv_path=None)
    assert caught.value.variable == "BACKEND_SERVICE_TOKEN"
    assert "secret" not in str(caught.value)
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or "secret" not in str(caught.value.__context__)


def test_token_never_shows_in_repr() -> None:
    settings = Settings.from_env({"BACKEND_SERVICE_TOKEN": "tok-abcdef"}, dotenv_path=None)
    assert "tok-abcdef" not in repr(settings)
    assert "tok-abcdef" not in str(settings)


def test_settings_are_immutable() -> None:
    settings = Settings()
    with pytest.raises(Exception, match="frozen"):
        settings.video_max_upload_bytes = 1  # type: ignore[misc]


def test_field_names_and_env_names_both_construct() -> None:
    assert Settings(video_max_upload_bytes=5).video_max_upload_bytes == 5
    assert Settings(VIDEO_MAX_UPLOAD_BYTES=6).video_max_upload_bytes == 6


def test_the_minimum_send_rate_sets_the_transports_attempt_bound() -> None:
    from ctrlupload.providers._backend import transport_for

    settings = Settings.from_env(
        {
            "STORAGE_CONNECT_TIMEOUT_S": "2",
            "STORAGE_READ_TIMEOUT_S": "3",
            "STORAGE_MIN_SEND_RATE_BYTES_S": "1048576",
        },
        dotenv_path=None,
    )
    transport = transport_for(settings)
    try:
        assert transport.config.attempt_bound_s(10 * 1048576) == 2 + 3 + 10
    finally:
        transport.close()
