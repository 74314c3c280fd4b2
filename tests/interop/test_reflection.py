"""Server reflection alone (no .proto files, no generated code) is enough to discover and call the API."""

import grpc
import pytest
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

SERVICES = {
    "ps": ["nanodist.v1.ParameterServer"],
    "barrier": ["nanodist.v1.Barrier"],
    "lock": ["nanodist.v1.Lock", "nanodist.v1.KeyValue"],
}


@pytest.mark.parametrize("role", SERVICES)
def test_services_and_methods_are_described_by_reflection(start_server, role):
    server = start_server(role)
    with grpc.insecure_channel(server.address) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        pool = descriptor_pool.DescriptorPool(database)  # a fresh pool: nothing generated is registered here
        assert set(SERVICES[role]) <= set(database.get_services())
        for name in SERVICES[role]:
            service = pool.FindServiceByName(name)
            assert service.methods, name
            for method in service.methods:
                assert method.input_type.full_name.startswith("nanodist.v1.")


def test_push_and_pull_through_reflection_with_json_messages(start_server):
    """What `grpcurl -d '{...}' ... nanodist.v1.ParameterServer/Push` does."""
    server = start_server("ps")
    with grpc.insecure_channel(server.address) as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))
        service = pool.FindServiceByName("nanodist.v1.ParameterServer")

        def call(method_name: str, body: dict) -> dict:
            method = service.methods_by_name[method_name]
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            stub = channel.unary_unary(
                f"/{service.full_name}/{method_name}",
                request_serializer=request_class.SerializeToString,
                response_deserializer=response_class.FromString,
            )
            return json_format.MessageToDict(stub(json_format.ParseDict(body, request_class()), timeout=10))

        # float32 [1, 2] is little-endian 0000803f 00000040, base64 in JSON
        init = {
            "entries": [
                {
                    "key": "w",
                    "value": {"dtype": "FLOAT32", "shape": [2], "data": "AACAPwAAAEA="},
                    "optimizer": {"kind": "SGD", "learning_rate": 1.0},
                }
            ]
        }
        assert call("Init", init)["results"][0]["created"] is True
        push = {
            "entries": [{"key": "w", "dense": {"dtype": "FLOAT32", "shape": [2], "data": "AACAPwAAAEA="}}],
            "request_id": "json-1",
        }
        assert call("Push", push)["versions"] == ["1"]
        pulled = call("Pull", {"entries": [{"key": "w"}]})
        assert pulled["entries"][0]["dense"]["data"] == "AAAAAAAAAAA="  # [0, 0] after w -= 1.0 * w
