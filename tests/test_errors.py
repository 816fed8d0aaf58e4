"""The exception tree, its texts and its structured attributes."""

import pickle

import pytest

import ctrlupload
from ctrlupload import (
    BackendError,
    IntegrityError,
    InvalidKeyError,
    SourceFileError,
    StorageConfigError,
    StorageError,
    StorageTransferError,
    StorageUploadError,
    UploadTooLargeError,
)
from ctrlupload._errors import __doc__ as tree_doc


@pytest.mark.parametrize(
    "cls",
    [
        InvalidKeyError,
        UploadTooLargeError,
        SourceFileError,
        BackendError,
        StorageTransferError,
        IntegrityError,
    ],
)
def test_every_upload_failure_is_a_storage_upload_error(cls: type[StorageUploadError]) -> None:
    error = cls("videos/a/video.mp4", "something broke")
    assert isinstance(error, StorageUploadError)
    assert isinstance(error, StorageError)
    assert error.code == "STORAGE_UPLOAD_FAILED"
    assert str(error) == "Storage upload failed for 'videos/a/video.mp4': something broke"
    assert cls.__name__ in tree_doc


def test_seed_error_text_is_kept() -> None:
    error = BackendError(
        "videos/V/S/J/video.mp4", "Presign request failed: HTTP 500", status_code=500
    )
    assert str(error) == (
        "Storage upload failed for 'videos/V/S/J/video.mp4': Presign request failed: HTTP 500"
    )
    assert (error.key, error.status_code, error.phase) == ("videos/V/S/J/video.mp4", 500, "presign")


def test_phase_defaults_per_class_and_can_be_overridden() -> None:
    assert StorageTransferError("k", "r").phase == "upload"
    assert BackendError("k", "r", phase="complete").phase == "complete"
    assert IntegrityError("k", "r").phase == "integrity"


def test_upload_errors_survive_pickling() -> None:
    error = BackendError(
        "k", "Complete notification failed: HTTP 500", phase="complete", status_code=500
    )
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is BackendError
    assert (copy.key, copy.reason, copy.phase, copy.status_code) == (
        "k",
        "Complete notification failed: HTTP 500",
        "complete",
        500,
    )
    assert str(copy) == str(error)


def test_config_error_is_a_value_error_naming_the_variable() -> None:
    error = StorageConfigError("bad", variable="BACKEND_BASE_URL")
    assert isinstance(error, ValueError)
    assert isinstance(error, StorageError)
    assert error.variable == "BACKEND_BASE_URL"


def test_every_exported_exception_descends_from_storage_error() -> None:
    exported = [getattr(ctrlupload, name) for name in ctrlupload.__all__]
    errors = [obj for obj in exported if isinstance(obj, type) and issubclass(obj, BaseException)]
    assert StorageError in errors
    for cls in errors:
        assert issubclass(cls, StorageError) or cls is ctrlupload.TransportFailure
