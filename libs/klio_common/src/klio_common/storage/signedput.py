"""PutObject as one signed HTTP request, without botocore's per-request pipeline.

The relay uploads thousands of objects a minute, and for each one aiobotocore runs parameter
validation, the S3 endpoint rule set (its cache is keyed by the object key, so it never hits),
the user-agent builder, a dozen event hooks and the response parser: about 3 ms of CPU on the
event loop per request here, more than the rest of an upload together. This module does what
those steps produce for a PutObject: the URL comes from the client once (a presigned URL, so
addressing style, endpoint and region are botocore's own), each request is signed by the client's
own SigV4 signer (credentials refresh as usual), sent by `httpput.HttpPut` on a worker thread,
and its answer mapped to the same outcomes and errors as a botocore call: a 2xx with its ETag and
checksum, a refusal as a `ClientError` with the S3 error code, a connection failure as an
``OSError``.

Like the client (``retries={"max_attempts": attempts}``), a request that fails to connect, times
out or gets a 5xx or throttling answer is tried again, ``attempts`` times in all.
"""

from __future__ import annotations

import asyncio
import ssl
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit

import botocore.exceptions
from botocore.awsrequest import AWSRequest
from botocore.config import Config

from klio_common.storage.httpput import HttpPut

_RETRY_STATUS = {500, 502, 503, 504}
_RETRY_CODES = {"SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable"}
_BACKOFF = 0.2  # seconds before the second try (botocore's standard mode: up to 1 s, jittered)


class SignedPut:
    """Signed PutObject requests for one bucket, on connections of their own.

    Args:
        client: the aiobotocore S3 client (its signer, credentials and endpoint are used).
        config: the client's botocore ``Config`` (payload signing, timeouts, pool size).
        bucket: the bucket.
        verify: TLS verification as botocore takes it: True, False or a CA bundle path.
        attempts: tries per request.
    """

    def __init__(
        self, client: Any, config: Config, bucket: str, *, verify: bool | str, attempts: int
    ) -> None:
        self._client = client
        self._config = config
        self._bucket = bucket
        self._attempts = max(1, attempts)
        self._base: str | None = None
        self._region = client.meta.region_name
        self._verify = verify
        self._http: HttpPut | None = None

    async def close(self) -> None:
        """Close the connections (requests in flight fail at once)."""
        if self._http is not None:
            self._http.close()
            self._http = None

    async def put(self, key: str, data: bytes, headers: Mapping[str, str]) -> dict[str, str]:
        """Send ``data`` to ``key`` with ``headers``; return the answer's headers (lowercase).

        Raises:
            botocore.exceptions.ClientError: the server refused (code, message and status in
                ``response`` as botocore puts them).
            OSError: no answer after every attempt (TimeoutError included).
        """
        url = await self._url(key)
        for attempt in range(1, self._attempts + 1):
            try:
                status, answer, body = await self._send(url, data, headers)
            except OSError:
                if attempt == self._attempts:
                    raise
                await asyncio.sleep(_BACKOFF)
                continue
            if 200 <= status < 300:
                return answer
            error = botocore_error(status, body, answer)
            code = error.response["Error"]["Code"]
            if attempt < self._attempts and (status in _RETRY_STATUS or code in _RETRY_CODES):
                await asyncio.sleep(_BACKOFF)
                continue
            raise error
        raise AssertionError("unreachable")  # pragma: no cover

    async def _send(
        self, url: str, data: bytes, headers: Mapping[str, str]
    ) -> tuple[int, dict[str, str], bytes]:
        request = AWSRequest(method="PUT", url=url, data=data, headers=dict(headers))
        request.headers["Content-Length"] = str(len(data))
        request.context["client_config"] = self._config  # payload_signing_enabled and the like
        auth = await self._client._request_signer.get_auth_instance(
            signing_name="s3", region_name=self._region, signature_version="s3v4"
        )
        auth.add_auth(request)
        parts = urlsplit(url)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        return await self._open(url).put(path, data, dict(request.headers.items()))

    def _open(self, url: str) -> HttpPut:
        if self._http is None:
            self._http = HttpPut(
                url,
                workers=self._config.max_pool_connections,
                connect_timeout=self._config.connect_timeout,
                read_timeout=self._config.read_timeout,
                tls=_ssl_context(self._verify),
            )
        return self._http

    async def _url(self, key: str) -> str:
        if self._base is None:
            # The client's own URL for a PutObject of a one-letter key: endpoint, addressing
            # style (path or virtual host) and region as botocore resolves them.
            signed = await self._client.generate_presigned_url(
                "put_object", Params={"Bucket": self._bucket, "Key": "k"}, ExpiresIn=60
            )
            base = signed.split("?", 1)[0]
            if not base.endswith("/k"):  # pragma: no cover - a botocore we do not know
                raise RuntimeError(f"unexpected presigned URL shape: {base}")
            self._base = base[:-1]
        return self._base + quote(key, safe="/~")


def _ssl_context(verify: bool | str) -> ssl.SSLContext:
    """The TLS context for ``verify`` as botocore takes it (True, False or a CA bundle)."""
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    context = ssl.create_default_context()
    if verify is False:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def botocore_error(
    status: int, body: bytes, headers: Mapping[str, str]
) -> botocore.exceptions.ClientError:
    """The `ClientError` botocore would raise for this answer."""
    code, message = str(status), ""
    if body:
        try:
            root = ET.fromstring(body)  # noqa: S314 - the endpoint's own error document
        except ET.ParseError:
            message = body[:200].decode(errors="replace")
        else:
            code = root.findtext("Code") or code
            message = root.findtext("Message") or ""
    response: Any = {
        "Error": {"Code": code, "Message": message},
        "ResponseMetadata": {"HTTPStatusCode": status, "HTTPHeaders": dict(headers)},
    }
    return botocore.exceptions.ClientError(response, "PutObject")
