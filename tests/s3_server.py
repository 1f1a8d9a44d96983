"""A real S3-compatible server for tests: moto's server (``moto[server]``, in
the ``test`` extra) in a subprocess on 127.0.0.1 and a random free port.

Nothing here touches AWS or this process's environment: the endpoint and the
dummy credentials are handed out as a dict (`MotoS3.env`, for subprocesses
and ``monkeypatch.setenv``) and as fsspec storage options
(`MotoS3.storage_options`).  `MotoS3.requests` reads back the requests the
server served (from its request log), which `s3_operation` names."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
import uuid

ACCESS_KEY = "loom-test-key"
SECRET_KEY = "loom-test-secret"
REGION = "us-east-1"


class MotoS3:
    """``with MotoS3() as s3:`` a running moto server; ``s3.stop()`` ends it
    (the tests' "remote store gone"); ``s3.bucket()`` makes a fresh bucket."""

    def __init__(self, ready_timeout: float = 30.0):
        self.ready_timeout = ready_timeout
        self.proc = None
        self.endpoint = None

    def start(self) -> "MotoS3":
        env = {**os.environ, **self.env_without_endpoint()}
        env.pop("AWS_ENDPOINT_URL", None)
        # the server logs every request: to a file (a pipe nobody drains would fill and stall the server)
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", "0"],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env, text=True)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            m = re.search(r"Running on (http://127\.0\.0\.1:\d+)", self._read_log(0)[:1 << 16])
            if m:
                self.endpoint = m.group(1)
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        text = self._read_log(0)
        self.stop()
        raise RuntimeError(f"moto server did not start within {self.ready_timeout} s: {text[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc is not None:
            self.log.close()

    def _read_log(self, offset: int) -> str:
        """The server's log from byte ``offset`` on.  Read with pread: the
        server writes through the same open file, so moving its offset
        (seek) would make the server overwrite what it logged."""
        fd = self.log.fileno()
        return os.pread(fd, max(0, os.fstat(fd).st_size - offset), offset).decode("utf-8", "replace")

    def log_offset(self) -> int:
        """Where the request log ends now (a ``since`` for `requests`)."""
        return os.fstat(self.log.fileno()).st_size

    def requests(self, since: int = 0, settle_s: float = 0.2) -> list[tuple[str, str, int]]:
        """The requests the server answered after ``since`` (a `log_offset`):
        ``[(method, target with query, HTTP status)]`` in the order logged.
        Waits ``settle_s`` first: a request is logged after its response."""
        time.sleep(settle_s)
        text = _COLOUR.sub("", self._read_log(since))  # werkzeug colours the lines of statuses other than 200
        return [(m.group(1), m.group(2), int(m.group(3))) for m in _REQUEST.finditer(text)]

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    @staticmethod
    def env_without_endpoint() -> dict:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_DEFAULT_REGION": REGION}

    @property
    def env(self) -> dict:
        """The variables that point botocore (s3fs) at this server."""
        return {**self.env_without_endpoint(), "AWS_ENDPOINT_URL": self.endpoint}

    @property
    def storage_options(self) -> dict:
        """The same as s3fs storage options."""
        return {"endpoint_url": self.endpoint, "key": ACCESS_KEY, "secret": SECRET_KEY}

    def client(self):
        import boto3
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name=REGION)

    def bucket(self, name: str | None = None) -> str:
        """A new empty bucket; returns its name."""
        name = name or f"loom-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


_COLOUR = re.compile(r"\x1b\[[0-9;]*m")
_REQUEST = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP/[\d.]+" (\d{3})')


def s3_operation(method: str, target: str) -> str:
    """The S3 API operation of a path-style request (``PUT /bucket/key?...``):
    PutObject (also CopyObject: the log does not show its header),
    CreateMultipartUpload, UploadPart, CompleteMultipartUpload,
    AbortMultipartUpload, GetObject, HeadObject, HeadBucket, ListObjects,
    DeleteObject, DeleteObjects, or ``method bucket`` for other bucket
    requests."""
    from urllib.parse import parse_qs, urlsplit
    parts = urlsplit(target)
    query = parse_qs(parts.query, keep_blank_values=True)
    has_key = "/" in parts.path.strip("/")
    if not has_key:
        if method == "GET" and ("list-type" in query or "prefix" in query or "delimiter" in query or not query):
            return "ListObjects"
        if method == "POST" and "delete" in query:
            return "DeleteObjects"
        return "HeadBucket" if method == "HEAD" else f"{method} bucket"
    if method == "PUT":
        return "UploadPart" if "partNumber" in query else "PutObject"
    if method == "POST":
        return "CreateMultipartUpload" if "uploads" in query else "CompleteMultipartUpload"
    if method == "DELETE":
        return "AbortMultipartUpload" if "uploadId" in query else "DeleteObject"
    return {"GET": "GetObject", "HEAD": "HeadObject"}[method]
