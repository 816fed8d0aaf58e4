"""moto's standalone S3 server on a loopback port, for functional tests of the s3 store.

The server runs in-process on a daemon thread (``ThreadedMotoServer``) and speaks real
HTTP, so presigned URLs are exercised over real sockets. Starting takes about a
millisecond but stopping about half a second (werkzeug's shutdown poll), hence the
session-scoped fixture and per-test unique bucket names.

moto keeps its state in process-wide backends: every server in a process, and any
``mock_aws`` block, sees the same buckets. Credentials are fake and go to boto3 as
client arguments; ``os.environ`` is never touched.

What moto 5.2 does NOT check on a presigned PUT (measured against this server; real S3
and MinIO reject each with 403 SignatureDoesNotMatch/AccessDenied, or 501 for chunked):

* the signature: a tampered ``X-Amz-Signature`` is accepted;
* the key: a URL presigned for one key stores an object under another;
* expiry: a URL is accepted after ``X-Amz-Expires`` has passed;
* the signed ``Content-Type``: another type is accepted and stored as sent;
* the signed ``Content-Length``: a body of another length is accepted;
* framing: ``Transfer-Encoding: chunked`` is accepted (and decoded) instead of 501;
* checksums (issue 11): a signed ``x-amz-checksum-crc64nvme`` that does not match the
  body is stored anyway (S3: 400 BadDigest), a part's too, and a wrong full-object
  checksum at CompleteMultipartUpload still assembles the object. It does enforce
  ``If-None-Match: *`` (412), on a PUT and at complete. docs/contract.md ("What moto
  checks") has the table; tests/test_s3_checksums.py pins it.

It does enforce read access: an anonymous GET of an object answers 403 unless a bucket
policy allows ``s3:GetObject``, as on S3 (:meth:`MotoS3Server.make_bucket` adds one).
So rejection tests belong to the local store; against moto, test only the happy path,
what the store asks S3 for, and how it reports S3's errors.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import boto3
import requests
from botocore.config import Config
from moto.server import ThreadedMotoServer

__all__ = [
    "FAKE_ACCESS_KEY_ID",
    "FAKE_REGION",
    "FAKE_SECRET_ACCESS_KEY",
    "AuthMoto",
    "MotoS3Server",
    "moto_with_iam",
    "s3_reference_server",
]

FAKE_ACCESS_KEY_ID = "AKIAMOTOTESTING00000"
FAKE_SECRET_ACCESS_KEY = "moto-testing-secret-not-a-credential"
FAKE_REGION = "us-east-1"


class MotoS3Server:
    """A loopback S3 endpoint for the duration of a ``with`` block.

    Attributes:
        endpoint_url: ``http://127.0.0.1:<port>``, set once started.
    """

    def __init__(self) -> None:
        self.endpoint_url = ""
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._client: Any = None
        self._lock = threading.Lock()
        self._counter = 0

    def __enter__(self) -> MotoS3Server:
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint_url = f"http://{host}:{port}"
        self._client = self.client()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._server.stop()
        # stop() shuts the accept loop down but leaves the listening socket open.
        werkzeug_server = getattr(self._server, "_server", None)
        if werkzeug_server is not None:
            werkzeug_server.server_close()

    def client(self, endpoint_url: str | None = None, **config: Any) -> Any:
        """A boto3 S3 client for this server with fake credentials.

        Args:
            endpoint_url: Another endpoint to point the same client set-up at.
            **config: Extra ``botocore.config.Config`` options, e.g.
                ``retries={"total_max_attempts": 1}``.

        Without arguments this is one shared client (boto3 clients are thread-safe, and
        building one costs ~0.1 s of model loading).
        """
        if endpoint_url is None and not config and self._client is not None:
            return self._client
        session = boto3.session.Session(
            aws_access_key_id=FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            region_name=FAKE_REGION,
        )
        return session.client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}, **config),
        )

    def unique_bucket_name(self, prefix: str = "test") -> str:
        """A bucket name no other test in this process has used (none is created)."""
        with self._lock:
            self._counter += 1
            return f"{prefix}-{self._counter:05d}"

    def make_bucket(self, name: str | None = None, *, public_read: bool = True) -> str:
        """Create a bucket and return its name.

        Args:
            name: The bucket name; None picks a unique one.
            public_read: Add a bucket policy that lets anyone GET objects, as a bucket
                behind ``public_url`` needs; otherwise anonymous GETs answer 403.
        """
        bucket = name or self.unique_bucket_name()
        self._client.create_bucket(Bucket=bucket)
        if public_read:
            policy = {
                "Version": "2012-10-17",
                "Statement": [
                    {
                        "Effect": "Allow",
                        "Principal": "*",
                        "Action": "s3:GetObject",
                        "Resource": f"arn:aws:s3:::{bucket}/*",
                    }
                ],
            }
            self._client.put_bucket_policy(Bucket=bucket, Policy=json.dumps(policy))
        return bucket


@contextlib.contextmanager
def s3_reference_server(
    moto: MotoS3Server, data_dir: Path, monkeypatch: Any
) -> Iterator[tuple[Any, str]]:
    """The reference backend with its s3 store on a fresh bucket of ``moto``.

    The backend takes credentials from boto3's usual chain: here the environment, set
    through ``monkeypatch`` (pytest's) for the test's duration.

    Yields:
        The running ``ReferenceServer`` and the bucket's name.
    """
    from ctrlupload.server import ReferenceServer, ServerConfig

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET_ACCESS_KEY)
    bucket = moto.make_bucket()
    config = ServerConfig(
        port=0,
        data_dir=data_dir,
        store="s3",
        s3_bucket=bucket,
        s3_endpoint_url=moto.endpoint_url,
        s3_region=FAKE_REGION,
    )
    with ReferenceServer(config) as server:
        yield server, bucket


@dataclasses.dataclass(frozen=True)
class AuthMoto:
    """A moto server that checks credentials and IAM policies (see :func:`moto_with_iam`).

    Attributes:
        endpoint_url: Where it listens.
        bucket: A bucket made before checks were switched on.
        denied_key: ``(access key id, secret)`` of an IAM user with no permissions.
    """

    endpoint_url: str
    bucket: str
    denied_key: tuple[str, str]


_AUTH_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()  # until the parent closes the pipe
server.stop()
"""


@contextlib.contextmanager
def moto_with_iam() -> Iterator[AuthMoto]:
    """moto in a child process, with IAM authentication and authorisation on.

    moto checks credentials only when ``INITIAL_NO_AUTH_ACTION_COUNT`` says so, and
    that setting is global to its process; a child of its own keeps the session's
    shared moto unaffected. Its checks apply to header-signed calls (what botocore
    sends); a presigned PUT it cannot check answers 500 once checks are on.
    """
    child = subprocess.Popen(
        [sys.executable, "-c", _AUTH_CHILD],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        endpoint = child.stdout.readline().strip()
        assert endpoint.startswith("http://"), "moto did not start"
        session = boto3.session.Session(
            aws_access_key_id=FAKE_ACCESS_KEY_ID,
            aws_secret_access_key=FAKE_SECRET_ACCESS_KEY,
            region_name=FAKE_REGION,
        )
        config = Config(signature_version="s3v4", s3={"addressing_style": "path"})
        session.client("s3", endpoint_url=endpoint, config=config).create_bucket(
            Bucket="auth-renders"
        )
        iam = session.client("iam", endpoint_url=endpoint)
        iam.create_user(UserName="renderer")
        key = iam.create_access_key(UserName="renderer")["AccessKey"]
        # From here on every call is authenticated and authorised.
        answer = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=10)
        assert answer.status_code == 200, answer.text
        yield AuthMoto(endpoint, "auth-renders", (key["AccessKeyId"], key["SecretAccessKey"]))
    finally:
        if child.stdin is not None:
            child.stdin.close()
        try:
            child.wait(timeout=10)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
