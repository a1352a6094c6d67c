"""Schemathesis hooks for scripts/schemathesis: the binary media types of the PKI endpoints
(EST's `application/pkcs10`, OCSP's `application/ocsp-request`) go on the wire as the bytes
generated for them, as `application/octet-stream` does."""

import schemathesis

for media_type in ("application/pkcs10", "application/ocsp-request"):
    schemathesis.serializer.alias(media_type, "application/octet-stream")

# Hypothesis describes each `.filter(lambda …)` by parsing the lambda's source file; on
# CPython 3.11 that parse of schemathesis's largest module sometimes fails with
# "SystemError: AST constructor recursion depth mismatch", an error of the tool that ends the
# operation's tests. The description only names the strategy in a repr: fall back to a plain
# one instead.
from hypothesis.internal import lambda_sources  # noqa: E402

_lambda_description = lambda_sources.lambda_description


def _robust_lambda_description(f):
    try:
        return _lambda_description(f)
    except SystemError:
        return "lambda"


lambda_sources.lambda_description = _robust_lambda_description
