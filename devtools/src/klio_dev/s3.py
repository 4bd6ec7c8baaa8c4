"""A local S3 endpoint: moto in server mode, run as a child process, data in memory only."""

from __future__ import annotations

import http.client
import os
import sys
from pathlib import Path
from typing import Any

from klio_dev.processes import ServerError, ServerProcess

ACCESS_KEY = "testing"
SECRET_KEY = "testing"  # noqa: S105 - moto accepts any credentials
REGION = "us-east-1"

# Moto spools object bodies above a few MB to temporary files; a buffer this large keeps
# every object in the server's memory, so nothing outlives the process.
_IN_MEMORY_BUFFER = str(1 << 40)


class S3Server(ServerProcess):
    """``python -m moto.server`` on 127.0.0.1; every bucket is lost when it stops.

    Credentials are fixed test values and never exported by this class: merge `env()` into
    a child process's environment, or use `client()` in the test process.

    Args:
        base_dir: parent directory of the server's own directory (log only).
        port: HTTP port, or None for a free one.
        name: directory and log name.
    """

    def __init__(self, base_dir: Path, *, port: int | None = None, name: str = "s3") -> None:
        super().__init__(base_dir, name=name, port=port)

    @property
    def endpoint_url(self) -> str:
        """The endpoint, ``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        """Return the moto server command line."""
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def process_env(self) -> dict[str, str]:
        """Return the moto process's environment (ours, with in-memory object buffers)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MOTO_", "AWS_"))}
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = _IN_MEMORY_BUFFER
        env["MOTO_PORT"] = str(self.port)
        # Anything else moto might spill stays in our directory, removed with it.
        env["TMPDIR"] = str(self.dir)
        return env

    def ready(self, log_offset: int) -> bool:
        """Return True once this process listens (its log says so) and answers HTTP."""
        # The log line comes first: another server on the port would answer HTTP too.
        if f"Running on {self.endpoint_url}" not in self.log_text(log_offset):
            return False
        try:
            self._request("GET", "/moto-api/", timeout=1)
        except OSError:
            return False
        return True

    def env(self) -> dict[str, str]:
        """Return the standard AWS variables for this endpoint's test credentials.

        Returns:
            ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN`` and
            ``AWS_DEFAULT_REGION``, to merge into a child process's environment.
        """
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_SESSION_TOKEN": "testing",
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self) -> Any:
        """Return a boto3 S3 client bound to this endpoint with the test credentials."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name=REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (us-east-1 takes no location constraint)."""
        self.client().create_bucket(Bucket=name)

    def reset(self) -> None:
        """Drop every bucket and object while the server keeps running."""
        status = self._request("POST", "/moto-api/reset", timeout=10)
        if status != 200:
            raise ServerError(f"moto reset on {self.endpoint_url} answered HTTP {status}")

    def _request(self, method: str, path: str, *, timeout: float) -> int:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path)
            response = conn.getresponse()
            response.read()
            return response.status
        finally:
            conn.close()
