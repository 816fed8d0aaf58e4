"""A bad setting's message says where its value came from: the environment or a .env file."""

from __future__ import annotations

import traceback
from pathlib import Path

import pytest

from ctrlupload import Settings, StorageConfigError


def _load_error(environ: dict[str, str], dotenv_path: str | Path | None) -> StorageConfigError:
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_env(environ, dotenv_path=dotenv_path)
    return caught.value


def test_a_bad_value_from_the_environment_says_so() -> None:
    error = _load_error({"VIDEO_MAX_UPLOAD_BYTES": "lots"}, None)
    assert str(error).startswith(
        "Invalid setting VIDEO_MAX_UPLOAD_BYTES (from the environment): Input should be"
    )
    assert error.variable == "VIDEO_MAX_UPLOAD_BYTES"


def test_the_process_environment_is_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STORAGE_RETRY_ATTEMPTS", "0")
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_env(dotenv_path=None)
    assert "Invalid setting STORAGE_RETRY_ATTEMPTS (from the environment): " in str(caught.value)
    assert caught.value.variable == "STORAGE_RETRY_ATTEMPTS"


def test_a_bad_value_from_dotenv_names_the_files_absolute_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text("STORAGE_PROVIDER=local\nVIDEO_MAX_UPLOAD_BYTES=-1\n")
    monkeypatch.chdir(tmp_path)
    error = _load_error({}, ".env")  # relative, as the default is
    assert str(error).startswith(
        f"Invalid setting VIDEO_MAX_UPLOAD_BYTES (from .env at {tmp_path / '.env'}): "
        "Input should be greater than or equal to 0"
    )
    assert error.variable == "VIDEO_MAX_UPLOAD_BYTES"


def test_the_environment_overriding_dotenv_is_the_source(tmp_path: Path) -> None:
    dotenv = tmp_path / "settings.env"
    dotenv.write_text("STORAGE_MULTIPART=auto\n")
    error = _load_error({"STORAGE_MULTIPART": "sometimes"}, dotenv)
    assert "Invalid setting STORAGE_MULTIPART (from the environment): " in str(error)
    assert error.variable == "STORAGE_MULTIPART"


def test_the_first_problems_source_is_named_and_the_rest_counted(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text("STORAGE_PROVIDER=ftp\n")
    error = _load_error({"STORAGE_RETRY_ATTEMPTS": "0"}, dotenv)
    assert str(error).startswith(f"Invalid setting STORAGE_PROVIDER (from .env at {dotenv}): ")
    assert str(error).endswith("(and 1 more problems)")
    assert error.variable == "STORAGE_PROVIDER"


def test_a_bad_token_in_dotenv_is_located_but_not_echoed(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text('BACKEND_SERVICE_TOKEN="super secret-token"\n')
    error = _load_error({}, dotenv)
    assert str(error) == (
        f"Invalid setting BACKEND_SERVICE_TOKEN (from .env at {dotenv}): "
        "Value error, must not contain whitespace"
    )
    assert error.variable == "BACKEND_SERVICE_TOKEN"
    shown = "".join(traceback.format_exception(error)) + repr(error)
    assert "secret" not in shown
    assert error.__cause__ is None
    assert error.__context__ is None


def test_from_mapping_has_no_source_and_keeps_its_wording() -> None:
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_mapping({"VIDEO_MAX_UPLOAD_BYTES": "lots"})
    assert str(caught.value).startswith("Invalid setting VIDEO_MAX_UPLOAD_BYTES: Input should be")
    assert caught.value.variable == "VIDEO_MAX_UPLOAD_BYTES"


def test_from_mapping_names_an_unknown_variable() -> None:
    with pytest.raises(StorageConfigError) as caught:
        Settings.from_mapping({"STORAGE_PROVDER": "local"})
    assert str(caught.value) == "Invalid setting STORAGE_PROVDER: Extra inputs are not permitted"
    assert caught.value.variable == "STORAGE_PROVDER"
