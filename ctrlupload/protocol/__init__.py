"""The protocol, with no network: what to send and how to read what came back.

In the style of google-resumable-media's ``prepare_*`` / ``process_*`` pairs, every
decision that needs no socket lives here as a plain function or a frozen model, and
tests drive it without a server:

* ``_contract``: the backend's internal API as JSON models (requests built, answers
  checked);
* ``_parts``: multipart part planning under S3's limits;
* ``_answers``: reading answers: expired presigned URLs in every form, S3 error XML,
  the ETag check, the backend's JSON answers, and whether a failure can be resumed.

The engine (:mod:`ctrlupload.engine`) sends; this package decides.
"""

from ._answers import (
    EXPIRED_MARKER,
    attempts_suffix,
    check_etag,
    decode_backend_answer,
    is_expired_answer,
    is_resumable,
    json_error_detail,
    process_put_answer,
    s3_error_detail,
    s3_error_fields,
    s3_error_region,
    signature_expiry,
)
from ._contract import (
    CompletedPart,
    CompleteRequest,
    DeleteRequest,
    ListedPart,
    MultipartAbortRequest,
    MultipartCompleteRequest,
    MultipartCompleteResponse,
    MultipartInitiateRequest,
    MultipartInitiateResponse,
    MultipartListRequest,
    MultipartListResponse,
    MultipartPresignRequest,
    MultipartPresignResponse,
    PresignedPart,
    PresignRequest,
    PresignResponse,
    ResponseModel,
    StatusResponse,
    bare_etag,
    parse_response,
)
from ._parts import (
    DEFAULT_MULTIPART_THRESHOLD_BYTES,
    DEFAULT_PART_BYTES,
    GIB,
    MAX_OBJECT_BYTES,
    MAX_PART_BYTES,
    MAX_PARTS,
    MAX_SINGLE_PUT_BYTES,
    MIB,
    MIN_PART_BYTES,
    Part,
    check_part_size,
    choose_part_size,
    multipart_etag,
    plan_parts,
)

__all__ = [
    "DEFAULT_MULTIPART_THRESHOLD_BYTES",
    "DEFAULT_PART_BYTES",
    "EXPIRED_MARKER",
    "GIB",
    "MAX_OBJECT_BYTES",
    "MAX_PARTS",
    "MAX_PART_BYTES",
    "MAX_SINGLE_PUT_BYTES",
    "MIB",
    "MIN_PART_BYTES",
    "CompleteRequest",
    "CompletedPart",
    "DeleteRequest",
    "ListedPart",
    "MultipartAbortRequest",
    "MultipartCompleteRequest",
    "MultipartCompleteResponse",
    "MultipartInitiateRequest",
    "MultipartInitiateResponse",
    "MultipartListRequest",
    "MultipartListResponse",
    "MultipartPresignRequest",
    "MultipartPresignResponse",
    "Part",
    "PresignRequest",
    "PresignResponse",
    "PresignedPart",
    "ResponseModel",
    "StatusResponse",
    "attempts_suffix",
    "bare_etag",
    "check_etag",
    "check_part_size",
    "choose_part_size",
    "decode_backend_answer",
    "is_expired_answer",
    "is_resumable",
    "json_error_detail",
    "multipart_etag",
    "parse_response",
    "plan_parts",
    "process_put_answer",
    "s3_error_detail",
    "s3_error_fields",
    "s3_error_region",
    "signature_expiry",
]
