"""Method handlers whose request parsing cannot fail the call with UNKNOWN.

gRPC answers a request that its deserializer cannot parse with UNKNOWN. These
parsers hand the handler a MalformedRequest instead, which the boundary
decorators turn into INVALID_ARGUMENT naming the message type.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError, Message


class MalformedRequest:
    def __init__(self, type_name: str, error: str) -> None:
        self.type_name = type_name
        self.error = error

    def describe(self) -> str:
        return f"the request is not a valid {self.type_name} ({self.error})"


def safe_parser(message_class: type[Message]) -> Callable[[bytes], Message | MalformedRequest]:
    def parse(data: bytes) -> Message | MalformedRequest:
        try:
            return message_class.FromString(data)
        except DecodeError as error:
            return MalformedRequest(message_class.DESCRIPTOR.full_name, str(error))

    return parse


def servicer_handler(servicer: Any, service: ServiceDescriptor) -> grpc.GenericRpcHandler:
    """A generic handler for every unary method of `service`, implemented by `servicer.<Method>`."""
    handlers = {}
    for method in service.methods:
        if method.client_streaming or method.server_streaming:
            raise ValueError(f"{service.full_name}.{method.name}: only unary methods are supported here")
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        handlers[method.name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, method.name),
            request_deserializer=safe_parser(request_class),
            response_serializer=response_class.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(service.full_name, handlers)
