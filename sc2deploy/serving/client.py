"""A small client for the completion service (used by `sc2deploy complete`, the tests and the benchmark)."""
from __future__ import annotations

from collections.abc import Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.serving.v1 import completion_pb2_grpc as pb_grpc

FINISH_NAMES = {pb.FINISH_REASON_UNSPECIFIED: "unspecified", pb.FINISH_REASON_LENGTH: "length",
                pb.FINISH_REASON_EOS: "eos", pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_CANCELLED: "cancelled"}


# How `sc2deploy complete` (and any CLI) reports a failed call: the user's mistakes exit 2 with the fix, like every
# other bad input; the server's failures exit 1. Each maps to (exit status, what to do).
_CODE_ADVICE: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (2, "fix the request"),
    grpc.StatusCode.OUT_OF_RANGE: (2, "fix the request"),
    grpc.StatusCode.FAILED_PRECONDITION: (2, "fix the request"),
    grpc.StatusCode.UNAUTHENTICATED: (2, "give the server's API key with --api-key-file FILE or SC2DEPLOY_API_KEY"),
    grpc.StatusCode.PERMISSION_DENIED: (2, "give an API key this server accepts"),
    grpc.StatusCode.UNIMPLEMENTED: (2, "is --server the address of `sc2deploy serve`, and is the client as new as "
                                       "the server?"),
    grpc.StatusCode.NOT_FOUND: (2, "is --server the address of `sc2deploy serve`?"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (2, "send a smaller request, or retry when the server is less busy"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (1, "raise --timeout or lower --max-tokens"),
    grpc.StatusCode.UNAVAILABLE: (2, "is `sc2deploy serve` running there? check --server HOST:PORT, and "
                                     "--tls/--tls-ca if the server uses TLS (or drop them if it does not)"),
}


def describe_error(error: grpc.RpcError, target: str) -> tuple[str, int]:
    """(one line, exit status) for a failed call to `target`: 2 for what the user can fix (a bad request, a
    missing or wrong API key, an address with no server, a request over a limit), 1 for the server's failures."""
    code = error.code() if callable(getattr(error, "code", None)) else grpc.StatusCode.UNKNOWN
    details = error.details() if callable(getattr(error, "details", None)) else str(error)
    details = " ".join(str(details or "").split()) or "no details"
    exit_code, advice = _CODE_ADVICE.get(code, (1, "the server failed; see its log"))
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"cannot reach a server at {target} (UNAVAILABLE: {details}); {advice}", exit_code
    return f"the server at {target} answered {code.name}: {details}; {advice}", exit_code


def make_request(prompt: str, suffix: str = "", *, max_tokens: int | None = None, temperature: float = 0.0,
                 top_p: float | None = None, top_k: int = 0, seed: int | None = None, stop=(), logprobs: int = 0,
                 repo_name: str = "", file_path: str = "", context_files=()) -> pb.CompleteRequest:
    """A CompleteRequest; None leaves an optional field unset (the server's default)."""
    request = pb.CompleteRequest(prompt=prompt, suffix=suffix, temperature=temperature, top_k=top_k,
                                 stop=list(stop), logprobs=logprobs, repo_name=repo_name, file_path=file_path,
                                 context_files=[pb.ContextFile(path=p, content=c) for p, c in context_files])
    if max_tokens is not None:
        request.max_tokens = max_tokens
    if top_p is not None:
        request.top_p = top_p
    if seed is not None:
        request.seed = seed
    return request


class Client:
    def __init__(self, target: str, *, tls: bool = False, root_certificates: bytes | None = None,
                 api_key: str | None = None, max_message_bytes: int = 4 << 20, server_name: str | None = None):
        options: list[tuple[str, int | str]] = [("grpc.max_receive_message_length", max_message_bytes),
                   ("grpc.max_send_message_length", max_message_bytes)]
        if server_name:
            options.append(("grpc.ssl_target_name_override", server_name))
        if tls or root_certificates is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=root_certificates)
            self.channel = grpc.secure_channel(target, credentials, options=options)
        else:
            self.channel = grpc.insecure_channel(target, options=options)
        self.metadata = [("authorization", f"Bearer {api_key}")] if api_key else None
        self.stub = pb_grpc.CompletionServiceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)

    def complete(self, request: pb.CompleteRequest, timeout: float | None = None) -> pb.CompleteResponse:
        return self.stub.Complete(request, timeout=timeout, metadata=self.metadata)

    def stream(self, request: pb.CompleteRequest, timeout: float | None = None) -> Iterator[pb.CompleteChunk]:
        """The streaming call; it is also a grpc.Future: `.cancel()` stops the generation on the server."""
        return self.stub.CompleteStream(request, timeout=timeout, metadata=self.metadata)

    def info(self, timeout: float | None = 10.0) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=timeout, metadata=self.metadata)

    def health(self, service: str = "", timeout: float | None = 10.0) -> str:
        """SERVING, NOT_SERVING, ... as a name."""
        response = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        grpc.channel_ready_future(self.channel).result(timeout=timeout)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
