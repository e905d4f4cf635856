"""Reading CompleteRequest bytes leniently, so invalid UTF-8 is an INVALID_ARGUMENT and not a parse failure.

protobuf refuses proto3 `string` fields holding invalid UTF-8 while parsing, and gRPC turns a failed
parse into an opaque INTERNAL error before the servicer runs. The server therefore parses requests
with a twin of CompleteRequest whose string fields are `bytes` (the wire format is identical) and
validates the text itself, naming the field that is wrong.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from sc2deploy.errors import UserError
from sc2deploy.serving.v1 import completion_pb2 as pb
from sc2deploy.tokenizer import validate_text

_LENIENT_PACKAGE = "sc2deploy.v1.lenient"


def _lenient_classes() -> dict[str, Any]:
    """CompleteRequest, ContextFile, ClassifyRequest and EmbedRequest with every string field turned into bytes,
    in a private pool."""
    source = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(source)
    file = descriptor_pb2.FileDescriptorProto(name="sc2deploy/v1/lenient.proto", package=_LENIENT_PACKAGE,
                                              syntax=source.syntax)
    for message in source.message_type:
        if message.name not in _LENIENT:
            continue
        copy = file.message_type.add()
        copy.CopyFrom(message)
        for field in copy.field:
            if field.type == descriptor_pb2.FieldDescriptorProto.TYPE_STRING:
                field.type = descriptor_pb2.FieldDescriptorProto.TYPE_BYTES
            if field.type_name:
                field.type_name = field.type_name.replace(".sc2deploy.v1.", f".{_LENIENT_PACKAGE}.")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_LENIENT_PACKAGE}.{name}"))
            for name in _LENIENT}


_LENIENT = ("CompleteRequest", "ContextFile", "ClassifyRequest", "EmbedRequest")
_lenient = _lenient_classes()
_LenientRequest = _lenient["CompleteRequest"]


@dataclass
class BadRequest:
    """What the deserializer hands the servicer when the bytes are not a CompleteRequest at all."""

    reason: str


def parse_request(data: bytes, max_bytes: int | None = None) -> pb.CompleteRequest | BadRequest:
    """Request bytes -> a CompleteRequest, or BadRequest naming the field with invalid UTF-8, or saying the
    message is over `max_bytes` (checked before parsing)."""
    if max_bytes is not None and len(data) > max_bytes:
        return BadRequest(f"the request is {len(data)} bytes, more than a prompt that fits the model's context can "
                          f"be ({max_bytes} bytes); shorten the prompt")
    try:
        return pb.CompleteRequest.FromString(data)
    except DecodeError:
        pass
    try:
        raw = _LenientRequest.FromString(data)
    except DecodeError:
        return BadRequest("the request is not a valid sc2deploy.v1.CompleteRequest message")
    fields = [("prompt", raw.prompt), ("suffix", raw.suffix), ("repo_name", raw.repo_name),
              ("file_path", raw.file_path)]
    fields += [(f"stop[{i}]", s) for i, s in enumerate(raw.stop)]
    for i, f in enumerate(raw.context_files):
        fields += [(f"context_files[{i}].path", f.path), (f"context_files[{i}].content", f.content)]
    for name, value in fields:
        try:
            validate_text(value, name)
        except UserError as e:
            return BadRequest(str(e))
    return BadRequest("the request is not a valid sc2deploy.v1.CompleteRequest message")


def parse_model_info_request(data: bytes) -> pb.GetModelInfoRequest | BadRequest:
    try:
        return pb.GetModelInfoRequest.FromString(data)
    except DecodeError:
        return BadRequest("the request is not a valid sc2deploy.v1.GetModelInfoRequest message")


def parse_prompt_request(kind, data: bytes, max_bytes: int | None = None):
    """Bytes -> a ClassifyRequest or EmbedRequest (`kind`), or BadRequest: over `max_bytes`, invalid UTF-8 in a
    string field (named), or not the message at all."""
    name = kind.DESCRIPTOR.name
    if max_bytes is not None and len(data) > max_bytes:
        return BadRequest(f"the request is {len(data)} bytes, more than a prompt that fits the model's context can "
                          f"be ({max_bytes} bytes); shorten the prompt")
    try:
        return kind.FromString(data)
    except DecodeError:
        pass
    try:
        raw = _lenient[name].FromString(data)
    except DecodeError:
        return BadRequest(f"the request is not a valid sc2deploy.v1.{name} message")
    for field in kind.DESCRIPTOR.fields:
        if field.type == field.TYPE_STRING:
            try:
                validate_text(getattr(raw, field.name), field.name)
            except UserError as e:
                return BadRequest(str(e))
    return BadRequest(f"the request is not a valid sc2deploy.v1.{name} message")
