"""The signed PUT maps an S3 error answer to the ClientError botocore would raise."""

from __future__ import annotations

from klio_common.storage.signedput import botocore_error


def test_an_error_document_gives_code_message_and_status() -> None:
    body = b"<?xml version='1.0'?><Error><Code>AccessDenied</Code><Message>no</Message></Error>"
    error = botocore_error(403, body, {"x-amz-request-id": "r1"})
    assert error.response["Error"] == {"Code": "AccessDenied", "Message": "no"}
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert error.operation_name == "PutObject"


def test_a_precondition_failure_keeps_its_status() -> None:
    error = botocore_error(412, b"", {})
    assert error.response["Error"]["Code"] == "412"
    assert error.response["ResponseMetadata"]["HTTPStatusCode"] == 412


def test_a_body_that_is_not_xml_becomes_the_message() -> None:
    error = botocore_error(502, b"Bad Gateway from the proxy", {})
    assert error.response["Error"] == {"Code": "502", "Message": "Bad Gateway from the proxy"}
