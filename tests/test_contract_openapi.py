"""The reference backend against its OpenAPI document, with schemathesis.

Every generated request to the internal API must get an answer the document allows
(status code, content type, body schema) and never a 5xx. The local store's own
endpoints are excluded: they need a valid signature, which generated data cannot have
(test_server_local.py covers them).
"""

from __future__ import annotations

import atexit
import tempfile
import uuid

import schemathesis
from hypothesis import HealthCheck, settings

from ctrlupload.server import AssetDB, LocalObjectStore, ReferenceBackend

TOKEN = "contract-test-token"

_data = tempfile.TemporaryDirectory(prefix="ctrlupload-contract-")
atexit.register(_data.cleanup)
app = ReferenceBackend(
    token=TOKEN,
    store=LocalObjectStore(_data.name, "http://testserver"),
    db=AssetDB(":memory:"),
)
schema = schemathesis.openapi.from_wsgi("/openapi.yaml", app).exclude(tag="reference-local-store")


@schema.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
def test_reference_backend_conforms_to_the_openapi_document(case: schemathesis.Case) -> None:
    if case.headers and "Idempotency-Key" in case.headers:
        # Generated keys repeat across cases with other bodies, which the backend must
        # refuse (422; test_server_multipart.py pins that). A real client sends a fresh
        # key per call.
        case.headers["Idempotency-Key"] = uuid.uuid4().hex
    case.call_and_validate(headers={"Authorization": f"Bearer {TOKEN}"})
