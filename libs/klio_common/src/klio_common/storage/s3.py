"""The S3 client (aioboto3): conditional, checksummed writes and reads, with actionable errors.

The errors, and how botocore's failures map to them, are in `klio_common.storage.s3errors`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aioboto3
import aiohttp
import botocore.exceptions
from botocore.config import Config

from klio_common.errors import KlioError, NotFound
from klio_common.runtime.settings import S3Settings
from klio_common.storage import s3errors
from klio_common.storage.s3errors import BucketUnavailable as BucketUnavailable  # re-exported
from klio_common.storage.signedput import SignedPut

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's minimum for every part but the last
MAX_PARTS = 10_000

RequestObserver = Callable[[str, int], None]
"""Called after every request as ``observer(op, body_bytes_sent)``, failed ones included."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the bucket says about one object.

    Attributes:
        key: the object key.
        size: bytes stored.
        checksum_sha256: the stored ``x-amz-checksum-sha256`` (base64; ``<b64>-<parts>`` for
            a multipart upload), or None when it was stored without one (and in listings).
        metadata: user metadata (``x-amz-meta-*``), keys in lower case.
    """

    key: str
    size: int
    checksum_sha256: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)


def sha256_checksum(data: bytes | memoryview) -> str:
    """The base64 SHA-256 S3 stores for a single-request upload of ``data``."""
    return base64.b64encode(hashlib.sha256(data).digest()).decode()


def part_size_for(size: int, threshold: int) -> int:
    """The part size of a multipart upload of ``size`` bytes (at least 5 MiB, ≤ 10,000 parts)."""
    part = max(MIN_PART_SIZE, threshold)
    return max(part, -(-size // MAX_PARTS))


def composite_checksum(data: bytes | memoryview, part_size: int) -> str:
    """The base64 SHA-256 of the parts' SHA-256 digests: what S3 stores for a multipart upload."""
    view = memoryview(data)
    digests = b"".join(
        hashlib.sha256(view[i : i + part_size]).digest() for i in range(0, len(view), part_size)
    )
    return base64.b64encode(hashlib.sha256(digests).digest()).decode()


def same_checksum(stored: str | None, expected: str) -> bool:
    """Whether a stored checksum (maybe with a ``-<parts>`` suffix) is ``expected``."""
    return stored is not None and stored.split("-", 1)[0] == expected


@dataclass(frozen=True)
class Stored:
    """The server's answer to a PUT that stored an object.

    Attributes:
        etag: the ETag it returned; for a single-part upload without SSE-KMS or SSE-C, the
            hex MD5 the server computed over the bytes it received.
        checksum_sha256: the SHA-256 it returned, when it returns one.
    """

    etag: str | None
    checksum_sha256: str | None = None

    def verified(self, md5: bytes) -> bool:
        """Whether the server's own MD5 of what it stored is ``md5`` (the digest we sent).

        False means "not proven here" (another ETag scheme, or other bytes): ask with HEAD.
        """
        return self.etag is not None and self.etag.strip('"').lower() == md5.hex()


class S3Store:
    """One bucket, through aioboto3. Use it as ``async with S3Store(settings) as store``.

    Credentials come only from the standard AWS chain. botocore retries a request at most
    ``attempts - 1`` times; retrying later is the caller's business (a `Retryable` error says
    when).

    Args:
        settings: bucket, endpoint, region and TLS settings (``tier2.s3``).
        observer: called after every request with the operation and the body bytes sent.
        connect_timeout: seconds to connect to the endpoint.
        read_timeout: seconds to wait for an answer.
        attempts: tries per request (botocore's own retries; 2 = one retry).
        session: an aioboto3 session to share with other stores of the same process (a session
            loads S3's service model, endpoint rules and resolver once: about 70 ms per client
            otherwise), or None for a session of its own.
    """

    def __init__(
        self,
        settings: S3Settings,
        *,
        observer: RequestObserver | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        attempts: int = 2,
        session: aioboto3.Session | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.endpoint = settings.endpoint_url or f"AWS S3 ({settings.region})"
        self._observer = observer
        self._config = Config(
            region_name=settings.region,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            retries={"max_attempts": attempts, "mode": "standard"},
            s3={
                "addressing_style": "path" if settings.endpoint_url else "auto",
                # Every body carries its own SHA-256 (x-amz-checksum-sha256, which S3 checks)
                # and uploads are verified afterwards: hashing it again for the signature
                # (botocore does so on every http:// request) adds CPU, not safety.
                "payload_signing_enabled": False,
            },
            # We send SHA-256 ourselves; no second (CRC) checksum on every request.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._attempts = attempts
        self._session = session
        self._puts: SignedPut | None = None

    async def __aenter__(self) -> S3Store:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def open(self) -> None:
        """Create the client (no request is made)."""
        if self._client is not None:
            return
        verify: bool | str = self.settings.verify_tls
        if self.settings.ca_bundle is not None:
            verify = str(self.settings.ca_bundle)
        session = self._session or aioboto3.Session()
        self._client = await self._stack.enter_async_context(
            session.client(
                "s3", endpoint_url=self.settings.endpoint_url, verify=verify, config=self._config
            )
        )
        self._puts = SignedPut(
            self._client, self._config, self.bucket, verify=verify, attempts=self._attempts
        )
        self._stack.push_async_callback(self._puts.close)

    async def close(self) -> None:
        """Close the client's connections."""
        self._client = self._puts = None
        await self._stack.aclose()

    # -- requests -------------------------------------------------------------------------------

    async def call(self, op: str, what: str, sent: int = 0, **params: Any) -> Any:
        """One request of the S3 API on this bucket (``op``, botocore's method name).

        Retention's own requests (object lock, deletes) go through here too. A refusal is
        botocore's ``ClientError``, for the caller to map (`client_error`); an unreachable
        endpoint is `BucketUnavailable`, naming ``what`` was being done.
        """
        if self._client is None:
            await self.open()
        try:
            return await getattr(self._client, op)(Bucket=self.bucket, **params)
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise s3errors.unreachable(exc, self.bucket, self.endpoint, what) from exc
        finally:
            if self._observer is not None:
                self._observer(op, sent)

    async def _put(self, key: str, data: bytes, headers: dict[str, str]) -> dict[str, str]:
        """A PutObject through `SignedPut` (the upload hot path), with `call`'s errors."""
        if self._puts is None:
            await self.open()
        assert self._puts is not None
        try:
            return await self._puts.put(key, data, headers)
        except (botocore.exceptions.BotoCoreError, aiohttp.ClientError, OSError) as exc:
            raise s3errors.unreachable(exc, self.bucket, self.endpoint, f"uploading {key}") from exc
        finally:
            if self._observer is not None:
                self._observer("put_object", len(data))

    def client_error(self, exc: botocore.exceptions.ClientError, what: str) -> KlioError:
        """The error for a refusal (`s3errors.client_error`); retention's own requests use it."""
        return s3errors.client_error(exc, self.bucket, self.endpoint, what)

    async def check(self) -> None:
        """Check that the bucket exists and the credentials may list it (one request).

        Raises:
            BucketUnavailable: unreachable endpoint, refused credentials or no such bucket;
                the message says which, with a hint.
            Permanent: any other refusal.
        """
        try:
            await self.call(
                "list_objects_v2", "listing the bucket", Prefix=self.settings.prefix, MaxKeys=1
            )
        except botocore.exceptions.ClientError as exc:
            raise self.client_error(exc, f"listing bucket '{self.bucket}'") from exc

    async def put_if_absent(
        self,
        key: str,
        data: bytes,
        *,
        metadata: Mapping[str, str] | None = None,
        checksum: str | None = None,
        md5: bytes | None = None,
    ) -> Stored | None:
        """Store ``data`` under ``key`` unless something is there (``If-None-Match: *``).

        The body carries its SHA-256 (``x-amz-checksum-sha256``), which S3 checks and stores;
        pass ``checksum`` (base64) when the caller has already computed it. With ``md5`` (the
        raw MD5 digest of ``data``) it also carries ``Content-MD5``, and the answer's ETag can
        be compared with it: see `Stored.verified`.

        Returns:
            What the server answered when it stored the object; None when the key already
            exists (nothing was changed).

        Raises:
            BucketUnavailable: see `check`; Permanent: the request was refused otherwise.
        """
        headers = {
            "If-None-Match": "*",
            "x-amz-sdk-checksum-algorithm": "SHA256",
            "x-amz-checksum-sha256": checksum or sha256_checksum(data),
        }
        if md5 is not None:
            headers["Content-MD5"] = base64.b64encode(md5).decode()
        for name, value in (metadata or {}).items():
            headers[f"x-amz-meta-{name}"] = value
        try:
            answer = await self._put(key, data, headers)
        except botocore.exceptions.ClientError as exc:
            if s3errors.precondition_failed(exc):
                return None
            raise self.client_error(exc, f"uploading {key}") from exc
        return Stored(etag=answer.get("etag"), checksum_sha256=answer.get("x-amz-checksum-sha256"))

    async def put_multipart_if_absent(
        self,
        key: str,
        data: bytes,
        *,
        part_size: int,
        metadata: Mapping[str, str] | None = None,
    ) -> bool:
        """Like `put_if_absent`, in parts of ``part_size`` bytes (each with its SHA-256).

        The stored checksum is then `composite_checksum` ``(data, part_size)``. An upload that
        fails or finds the key taken is aborted, so no parts are left behind.
        """
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part size {part_size} is below S3's minimum of {MIN_PART_SIZE}")
        try:
            started = await self.call(
                "create_multipart_upload",
                f"starting the upload of {key}",
                Key=key,
                ChecksumAlgorithm="SHA256",
                Metadata=dict(metadata or {}),
            )
        except botocore.exceptions.ClientError as exc:
            raise self.client_error(exc, f"starting the upload of {key}") from exc
        upload_id = started["UploadId"]
        done = False
        try:
            parts = []
            view = memoryview(data)
            for number, offset in enumerate(range(0, len(data), part_size), start=1):
                body = bytes(view[offset : offset + part_size])
                checksum = sha256_checksum(body)
                answer = await self.call(
                    "upload_part",
                    f"uploading part {number} of {key}",
                    len(body),
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    ChecksumAlgorithm="SHA256",
                    ChecksumSHA256=checksum,
                )
                parts.append(
                    {"PartNumber": number, "ETag": answer["ETag"], "ChecksumSHA256": checksum}
                )
            try:
                await self.call(
                    "complete_multipart_upload",
                    f"completing the upload of {key}",
                    Key=key,
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},
                    IfNoneMatch="*",
                )
            except botocore.exceptions.ClientError as exc:
                if s3errors.precondition_failed(exc):
                    return False
                raise
            done = True
        except botocore.exceptions.ClientError as exc:
            raise self.client_error(exc, f"uploading {key}") from exc
        finally:
            if not done:
                with contextlib.suppress(KlioError, botocore.exceptions.ClientError):
                    await self.call(
                        "abort_multipart_upload", f"aborting {key}", Key=key, UploadId=upload_id
                    )
        return True

    async def head(self, key: str) -> ObjectInfo | None:
        """Size, stored checksum and metadata of ``key``, or None when it does not exist."""
        try:
            answer = await self.call(
                "head_object", f"checking {key}", Key=key, ChecksumMode="ENABLED"
            )
        except botocore.exceptions.ClientError as exc:
            if s3errors.not_found(exc):
                return None
            raise self.client_error(exc, f"checking {key}") from exc
        return ObjectInfo(
            key=key,
            size=int(answer["ContentLength"]),
            checksum_sha256=answer.get("ChecksumSHA256"),
            metadata={k.lower(): v for k, v in (answer.get("Metadata") or {}).items()},
        )

    async def get(self, key: str) -> bytes:
        """The bytes of ``key``.

        Raises:
            NotFound: no such object; BucketUnavailable / Permanent: see `check`.
        """
        try:
            answer = await self.call("get_object", f"downloading {key}", Key=key)
            async with answer["Body"] as body:
                data: bytes = await body.read()
        except botocore.exceptions.ClientError as exc:
            if s3errors.not_found(exc):
                raise NotFound(f"object {key} is not in bucket '{self.bucket}'") from exc
            raise self.client_error(exc, f"downloading {key}") from exc
        except (aiohttp.ClientError, OSError) as exc:
            raise BucketUnavailable(f"bucket unreachable: downloading {key}: {exc}") from exc
        return data

    async def list(self, prefix: str) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in key order (no checksums)."""
        token: str | None = None
        while True:
            params: dict[str, Any] = {"Prefix": prefix}
            if token:
                params["ContinuationToken"] = token
            try:
                page = await self.call("list_objects_v2", f"listing {prefix}", **params)
            except botocore.exceptions.ClientError as exc:
                raise self.client_error(exc, f"listing {prefix}") from exc
            for item in page.get("Contents", []):
                yield ObjectInfo(key=item["Key"], size=int(item["Size"]))
            token = page.get("NextContinuationToken")
            if not page.get("IsTruncated") or not token:
                return

    async def delete(self, key: str) -> None:
        """Delete ``key`` (no error when it does not exist)."""
        try:
            await self.call("delete_object", f"deleting {key}", Key=key)
        except botocore.exceptions.ClientError as exc:
            raise self.client_error(exc, f"deleting {key}") from exc
