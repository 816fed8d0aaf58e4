"""A running reference backend against the OpenAPI document it serves, with schemathesis.

The document is loaded from the live server's ``GET /openapi.yaml``, so the test checks
what a client actually downloads. Every generated request, schema-valid or not, is run
through every check schemathesis has (``ALL_CHECKS``): the answer must be one the
document lists (status, content type, headers, body schema), never a 5xx; valid data
must be accepted and invalid data rejected; a missing required header, an undeclared
method and a missing or wrong bearer token must be refused (``ignored_auth`` probes
every 2xx without the token and with a wrong one and expects 401). The stateful test
follows the document's links (initiate to presign-parts, list-parts, complete and
abort; presign-put to complete), so the multipart calls also see a live upload_id
rather than only unknown ones.

The local store's endpoints (tag ``reference-local-store``) are included. Generated data
cannot carry a valid HMAC signature, so they only see the rejection paths (403, 400,
404), which must still be the documented S3-style answers; accepted uploads are covered
by test_server_local.py and test_server_multipart.py.

``use_after_free``, ``ensure_resource_availability`` and ``object_level_authorization``
run too, but find little to hold on to here: they reason about REST resource paths
(``POST /things`` then ``GET /things/{id}``) and identities, and this API names every
resource in a POST body under a single token.

Hypothesis runs derandomized (and schemathesis with a fixed seed), so the same requests
are sent on every run.
"""

from __future__ import annotations

import atexit
import functools
import re
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import CHECKS, is_check_class, load_all_checks
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import ignored_auth, positive_data_acceptance

from ctrlupload.server import ReferenceServer, ServerConfig

TOKEN = "contract-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The document's rule for Idempotency-Key (1 to 255 visible ASCII characters).
_VALID_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")

load_all_checks()
ALL_CHECKS: list[Callable[..., Any]] = [
    check for check in CHECKS.get_all() if not is_check_class(check)
]
INITIATE = "POST /internal/storage/multipart/initiate"
PRESIGN_PARTS = "POST /internal/storage/multipart/presign-parts"
MULTIPART_COMPLETE = "POST /internal/storage/multipart/complete"
COMPLETE_SET = "POST /internal/storage/complete-set"


def _refused_for_the_uploads_state(
    ctx: Any, response: schemathesis.Response, case: schemathesis.Case
) -> bool:
    """Whether a 400 to schema-valid data is one of those the document lists.

    JSON Schema cannot say "at most this upload's part count", "the parts storage
    holds, in order", "each object_key once", "one checksum per part number" or "an
    upload initiated with a checksum", so a schema-valid body can still be refused:
    presign-parts with a part number past the part count (the part count is taken
    from the initiate this request followed), or with ``checksums`` of another count
    than ``part_numbers`` or for an upload initiated without one; multipart complete
    (and an upload in complete-set) with ``invalid_part`` or ``bad_digest``, or with
    ``bad_request`` for a checksum given to an upload initiated without one; and
    complete-set with ``bad_request`` when two objects share a key. Any other 400 to
    valid data remains a failure.
    """
    if case.operation.label not in (PRESIGN_PARTS, MULTIPART_COMPLETE, COMPLETE_SET):
        return False
    error = response.json().get("error") if response.status_code == 400 else None
    body = case.body if isinstance(case.body, dict) else {}
    if case.operation.label == COMPLETE_SET:
        return error in ("invalid_part", "bad_digest") or (
            error == "bad_request" and _repeats_a_key(case.body)
        )
    if case.operation.label == PRESIGN_PARTS and error == "bad_request":
        checksums, numbers = body.get("checksums"), body.get("part_numbers")
        if (
            isinstance(checksums, list)
            and isinstance(numbers, list)
            and len(checksums) != len(numbers)
        ):
            return True
    if case.operation.label == MULTIPART_COMPLETE and error in ("invalid_part", "bad_digest"):
        return True
    initiate = ctx.internals.find_parent(case_id=case.id)
    if error != "bad_request" or initiate is None or initiate.operation.label != INITIATE:
        return False
    initiated = ctx.internals.find_response(case_id=initiate.id)
    if initiated is None or initiated.status_code != 200:
        return False
    # Checksums for an upload the backend did not take a checksum on (issue 11).
    unchecked = initiated.json().get("checksum_algorithm") is None
    if case.operation.label == MULTIPART_COMPLETE:
        return unchecked and body.get("checksum") is not None
    if unchecked and body.get("checksums") is not None:
        return True
    part_size = initiated.json()["part_size"]
    part_count = max(1, -(-initiate.body["content_length"] // part_size))
    return any(number > part_count for number in body["part_numbers"])


def _repeats_a_key(body: Any) -> bool:
    """Whether a complete-set body names one object_key twice (the schema cannot say)."""
    objects = body.get("objects") if isinstance(body, dict) else None
    if not isinstance(objects, list):
        return False
    keys = [item.get("object_key") for item in objects if isinstance(item, dict)]
    texts = [key for key in keys if isinstance(key, str)]
    return len(set(texts)) != len(texts)


@functools.wraps(positive_data_acceptance)
def _positive_data_acceptance(
    ctx: Any, response: schemathesis.Response, case: schemathesis.Case
) -> bool | None:
    if _refused_for_the_uploads_state(ctx, response, case):
        return None
    return positive_data_acceptance(ctx, response, case)


CHECKS_RUN = [
    _positive_data_acceptance if check is positive_data_acceptance else check
    for check in ALL_CHECKS
]

SETTINGS = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)


# An explicit config, so no schemathesis.toml found on disk can switch a check off. The
# stateful run sends valid data only: when a link fills a body field into a negative
# case, schemathesis keeps calling the now valid request negative. The stateless run
# covers invalid data.
_CONFIG = {"seed": 20240601, "phases": {"stateful": {"generation": {"mode": "positive"}}}}


def _served_schema(server: ReferenceServer) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(_CONFIG)
    api = schemathesis.openapi.from_url(f"{server.base_url}/openapi.yaml", config=config)
    api.config.update(base_url=server.base_url)
    return api


# The stateless run is parametrized at collection time, so its server runs for the
# module's import onwards (stopped at exit); schemathesis' lazy fixture loading does
# not work with every pytest 9 release.
_served_data = tempfile.TemporaryDirectory(prefix="ctrlupload-contract-")
_served = ReferenceServer(ServerConfig(port=0, data_dir=Path(_served_data.name), token=TOKEN))
_served.start()
atexit.register(_served_data.cleanup)
atexit.register(_served.stop)
served_api = _served_schema(_served)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ReferenceServer]:
    # A server of its own for each fixture test, so none depends on another's leftovers.
    with ReferenceServer(ServerConfig(port=0, data_dir=tmp_path, token=TOKEN)) as running:
        yield running


@pytest.fixture
def api(server: ReferenceServer) -> schemathesis.BaseSchema:
    return _served_schema(server)


def _as_a_client_sends_it(case: schemathesis.Case) -> None:
    """Replace the two generated values a real client never gets wrong by chance.

    A valid ``Idempotency-Key`` is made fresh: generated keys repeat across cases with
    other bodies, which the backend must refuse (422; test_server_multipart.py pins
    that). A valid ``Content-Length`` is left to requests to compute: a generated one
    that claims more bytes than the body holds makes the server wait for them (it reads
    a refused PUT's body so that the client sees the answer) until a timeout. Invalid
    values are left alone: they are the negative case under test.
    """
    headers = case.headers or {}
    key = headers.get("Idempotency-Key")
    if isinstance(key, str) and _VALID_IDEMPOTENCY_KEY.fullmatch(key):
        headers["Idempotency-Key"] = uuid.uuid4().hex
    length = headers.get("Content-Length")
    if isinstance(length, int) or (isinstance(length, str) and length.isdigit()):
        del headers["Content-Length"]


def test_every_check_schemathesis_has_is_run() -> None:
    assert len(CHECKS_RUN) == len(ALL_CHECKS)
    names = {check.__name__ for check in CHECKS_RUN}
    assert names >= {
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_schema_conformance",
        "response_headers_conformance",
        "negative_data_rejection",
        "positive_data_acceptance",
        "missing_required_header",
        "unsupported_method",
        "ignored_auth",
        "use_after_free",
        "ensure_resource_availability",
    }


@served_api.parametrize()
@SETTINGS
def test_reference_backend_conforms_to_its_served_document(case: schemathesis.Case) -> None:
    _as_a_client_sends_it(case)
    case.call_and_validate(headers=AUTH, checks=CHECKS_RUN)


def test_local_store_put_takes_an_encoded_slash_as_a_slash(server: ReferenceServer) -> None:
    # Generated keys contain '/', which schemathesis sends as %2F (as clients may).
    key = "videos/V-1/S-1/J-1/video.mp4"
    presigned = requests.post(
        f"{server.base_url}/internal/storage/presign-put",
        json={"object_key": key, "content_type": "video/mp4", "content_length": 5},
        headers=AUTH,
        timeout=5,
    ).json()
    url = presigned["upload_url"]
    encoded = url.replace(key, key.replace("/", "%2F"), 1)
    assert encoded != url
    stored = requests.put(encoded, data=b"hello", headers=presigned["headers"], timeout=5)
    assert stored.status_code == 200, stored.text
    assert requests.get(f"{server.base_url}/files/{key}", timeout=5).content == b"hello"


def test_reference_backend_conforms_along_the_document_links(
    api: schemathesis.BaseSchema,
) -> None:
    links = api.as_state_machine()

    class Workflow(links):  # type: ignore[misc,valid-type]
        def before_call(self, case: schemathesis.Case) -> None:
            _as_a_client_sends_it(case)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"headers": AUTH}

        def validate_response(
            self,
            response: schemathesis.Response,
            case: schemathesis.Case,
            additional_checks: Any = None,
            **kwargs: Any,
        ) -> None:
            case.validate_response(
                response,
                checks=CHECKS_RUN,
                headers=AUTH,
                transport_kwargs=kwargs or None,
                recorder=self.recorder,
            )

    Workflow.run(settings=settings(SETTINGS, max_examples=30, stateful_step_count=6))


def test_ignored_auth_passes_the_backend_and_fails_one_that_skips_the_token(
    server: ReferenceServer, api: schemathesis.BaseSchema
) -> None:
    # The control for the runs above: the check's probes (no token, a wrong one) get
    # 401 from the backend, and the check bites when a backend lets them through.
    def token_not_checked(environ: dict[str, Any], start_response: Any) -> Any:
        environ["HTTP_AUTHORIZATION"] = AUTH["Authorization"]
        return server.app(environ, start_response)

    body = {
        "object_key": "videos/V-1/S-1/J-1/video.mp4",
        "content_type": "video/mp4",
        "content_length": 10,
    }
    enforced = api["/internal/storage/presign-put"]["POST"].Case(body=body)
    assert enforced.call_and_validate(headers=AUTH, checks=[ignored_auth]).status_code == 200
    lax = schemathesis.openapi.from_wsgi("/openapi.yaml", token_not_checked)
    ignored = lax["/internal/storage/presign-put"]["POST"].Case(body=body)
    with pytest.raises(FailureGroup, match="without authentication"):
        ignored.call_and_validate(headers=AUTH, checks=[ignored_auth])


@pytest.mark.parametrize(
    ("schema", "model"),
    [
        (name, name)
        for name in (
            "PresignRequest",
            "PresignResponse",
            "CompleteRequest",
            "CompleteResponse",
            "DeleteRequest",
            "StatusResponse",
            "MultipartInitiateRequest",
            "MultipartInitiateResponse",
            "MultipartPresignRequest",
            "MultipartPresignResponse",
            "PresignedPart",
            "MultipartListRequest",
            "MultipartListResponse",
            "ListedPart",
            "CompletedPart",
            "MultipartCompleteRequest",
            "MultipartCompleteResponse",
            "MultipartAbortRequest",
            "CompleteSetRequest",
            "CompleteSetResponse",
            "CompletedObject",
        )
    ]
    + [
        ("CompleteSetStoredObject", "CompleteSetObject"),
        ("CompleteSetMultipartObject", "CompleteSetObject"),
    ],
)
def test_each_document_schema_names_exactly_its_models_fields(schema: str, model: str) -> None:
    """The document and protocol/_contract.py name the same fields (issue 11 added many)."""
    import yaml

    from ctrlupload.protocol import _contract
    from ctrlupload.server import openapi_document

    schemas = yaml.safe_load(openapi_document())["components"]["schemas"]
    assert set(schemas[schema]["properties"]) == set(getattr(_contract, model).model_fields)
