"""Who may call: API keys (a gRPC interceptor that refuses from the metadata, and the metrics endpoint's check),
and the TLS context made from the server's PEM files.

Clients send the key as `authorization: Bearer KEY` or `x-api-key: KEY` (gRPC metadata or HTTP headers). The
health service stays open so that load balancers and Kubernetes probes need no key.
"""
from __future__ import annotations

import hmac
import os
import ssl
import tempfile
from collections.abc import Callable, Iterable
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


def key_from_metadata(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    """The key in gRPC metadata or HTTP headers (names in lower case)."""
    for key, value in metadata or ():
        if key == "x-api-key":
            return value
        if key == "authorization" and value[:7].lower() == "bearer ":
            return value[7:].strip()
    return None


class KeyRing:
    """The accepted API keys; `allows` compares in constant time per key."""

    def __init__(self, keys: Iterable[str]):
        self._keys = [k.encode() for k in keys]

    def allows(self, given: str | None) -> bool:
        if given is None:
            return False
        data = given.encode()
        return any([hmac.compare_digest(data, k) for k in self._keys])  # a list: no early exit

    def refusal(self, given: str | None) -> str:
        return "missing API key: send `authorization: Bearer KEY`" if given is None else "wrong API key"


class ApiKeyInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call without a valid key from its metadata alone: the refusal never waits for the request
    message, so a client that sends headers and then nothing holds nothing."""

    def __init__(self, keys: KeyRing, on_reject: Callable[[str], None] | None = None):
        self._keys = keys
        self._on_reject = on_reject  # called with the method name, for metrics

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        given = key_from_metadata(handler_call_details.invocation_metadata)
        handler = await continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES) or self._keys.allows(given):
            return handler
        if self._on_reject:
            self._on_reject(method)
        return refusal_handler(handler, grpc.StatusCode.UNAUTHENTICATED, self._keys.refusal(given))


def refusal_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler that ends the call with `code` at once. It takes the request as a stream it never reads (the
    wire format does not say whether a method is unary), so it does not wait for the message."""

    async def refuse(request_iterator, context):
        await context.abort(code, message)

    async def refuse_stream(request_iterator, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator, as a streaming handler must be

    if handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(refuse_stream, response_serializer=handler.response_serializer)
    return grpc.stream_unary_rpc_method_handler(refuse, response_serializer=handler.response_serializer)


def server_ssl_context(cert_pem: bytes, key_pem: bytes) -> ssl.SSLContext:
    """A TLS server context from PEM bytes; a UserError when they are not a certificate chain and its key."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory(prefix="sc2deploy-tls-") as folder:  # load_cert_chain reads only files
        cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
        for path, data in ((cert, cert_pem), (key, key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            context.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise UserError(f"--tls-cert and --tls-key are not a PEM certificate chain and its private key "
                            f"({e.reason or e}); give the server's certificate and the key it was issued for") from None
    return context
