"""API-key authentication: a server interceptor, and reading key files.

Clients send the key as `authorization: Bearer KEY` or `x-api-key: KEY` metadata. The health
service stays open so that load balancers and Kubernetes probes need no key.
"""
from __future__ import annotations

import hmac
from pathlib import Path

import grpc

from sc2deploy.errors import UserError

OPEN_PREFIXES = ("/grpc.health.v1.Health/",)


def read_api_keys(path: str | Path) -> list[str]:
    """One key per line; blank lines and lines starting with # are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read API key file {path} ({e}); give a UTF-8 file with one key per line") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise UserError(f"API key file {path} holds no key; put one key per line")
    return keys


def key_from_metadata(metadata) -> str | None:
    for key, value in metadata or ():
        if key == "x-api-key":
            return value
        if key == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class ApiKeyInterceptor(grpc.ServerInterceptor):
    def __init__(self, keys: list[str], on_reject=None):
        self._keys = [k.encode() for k in keys]
        self._on_reject = on_reject  # called with the method name, for metrics

    def _allowed(self, given: str | None) -> bool:
        if given is None:
            return False
        data = given.encode()
        return any(hmac.compare_digest(data, k) for k in self._keys)  # no early exit: constant time per key

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        given = key_from_metadata(handler_call_details.invocation_metadata)
        if method.startswith(OPEN_PREFIXES) or self._allowed(given):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        if self._on_reject:
            self._on_reject(method)
        message = "missing API key: send `authorization: Bearer KEY`" if given is None else "wrong API key"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        def deny_stream(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
            yield  # pragma: no cover - makes this a generator, as a streaming handler must be

        make = {(False, False): grpc.unary_unary_rpc_method_handler,
                (False, True): grpc.unary_stream_rpc_method_handler,
                (True, False): grpc.stream_unary_rpc_method_handler,
                (True, True): grpc.stream_stream_rpc_method_handler}[(handler.request_streaming,
                                                                      handler.response_streaming)]
        return make(deny_stream if handler.response_streaming else deny,
                    request_deserializer=handler.request_deserializer,
                    response_serializer=handler.response_serializer)
