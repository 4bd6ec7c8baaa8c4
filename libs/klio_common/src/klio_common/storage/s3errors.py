"""The bucket's errors: `BucketUnavailable`, and botocore's failures as Klio's errors.

`S3Store` (`klio_common.storage.s3`) maps every failed request here. What an operator can fix
without a restart is `BucketUnavailable`, a `Retryable` with a short ``reason`` for ``/readyz``:
an unreachable endpoint, a 5xx or throttling answer, refused or missing credentials
(``AccessDenied``, 403, expired tokens) and a missing bucket. Any other refusal is `Permanent`.
Each message names the bucket, the endpoint and what was being done, with a hint.
"""

from __future__ import annotations

import botocore.exceptions

from klio_common.errors import KlioError, Permanent, Retryable

_CREDENTIALS_HINT = (
    "S3 credentials come from the standard AWS chain (AWS_ACCESS_KEY_ID and "
    "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, web identity or the instance role): check them and "
    "that they may read and write the bucket"
)
_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "403",
}
_BUCKET_CODES = {"NoSuchBucket", "AllAccessDisabled"}
_TRANSIENT_CODES = {
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "ServiceUnavailable",
    "InternalError",
    "BadDigest",
    "XAmzContentSHA256Mismatch",
}


class BucketUnavailable(Retryable):
    """The bucket cannot be used now: unreachable, refused the credentials, or missing.

    Retryable, since an operator can fix each of these without restarting anything.
    ``reason`` is the short form for ``/readyz``.
    """

    def __init__(self, reason: str, *, hint: str | None = None) -> None:
        self.reason = reason
        super().__init__(reason, hint=hint)


def unreachable(exc: Exception, bucket: str, endpoint: str, what: str) -> BucketUnavailable:
    """The error for a request that got no answer (or found no credentials to sign with)."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return BucketUnavailable(
            f"no S3 credentials found for bucket '{bucket}'", hint=_CREDENTIALS_HINT
        )
    return BucketUnavailable(
        f"bucket unreachable: {what}: cannot reach {endpoint}: {exc}",
        hint="check tier2.s3.endpoint_url, the network and the endpoint's TLS settings",
    )


def client_error(
    exc: botocore.exceptions.ClientError, bucket: str, endpoint: str, what: str
) -> KlioError:
    """The error for a request the bucket answered with a refusal."""
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    detail = error.get("Message") or code or f"HTTP {status}"
    if code in _ACCESS_CODES or status == 403:
        return BucketUnavailable(
            f"bucket '{bucket}' at {endpoint} refused the credentials: {code or status} ({detail})",
            hint=_CREDENTIALS_HINT,
        )
    if code in _BUCKET_CODES:
        return BucketUnavailable(
            f"bucket '{bucket}' does not exist at {endpoint}",
            hint="create the bucket, or fix tier2.s3.bucket and tier2.s3.endpoint_url",
        )
    if code in _TRANSIENT_CODES or status >= 500 or status == 0:
        return BucketUnavailable(f"bucket unreachable: {what} failed: {code} ({detail})")
    return Permanent(f"{what} failed: {code or status} ({detail})")


def precondition_failed(exc: botocore.exceptions.ClientError) -> bool:
    """Whether a conditional request found its condition false (a key already taken)."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code")
    return bool(status == 412 or code == "PreconditionFailed")


def not_found(exc: botocore.exceptions.ClientError) -> bool:
    """Whether the refusal says there is no such key."""
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = exc.response.get("Error", {}).get("Code")
    return bool(status == 404 and code in ("404", "NoSuchKey"))
