import pytest

from nanodist.client.rpc import replica_target


def test_one_address_is_left_to_grpc():
    assert replica_target("ps-0.ps:50051") == ("ps-0.ps:50051", [])


def test_replicas_are_resolved_in_order_and_keep_the_first_name_as_authority():
    target, options = replica_target("localhost:50071, 127.0.0.2:50072")
    assert target == "ipv4:127.0.0.1:50071,127.0.0.2:50072"
    assert ("grpc.default_authority", "localhost:50071") in options
    assert ("grpc.lb_policy_name", "pick_first") in options


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("localhost:1,b", "'b' is not HOST:PORT"),
        ("localhost:1,no-such-host.invalid:2", "cannot resolve 'no-such-host.invalid'"),
    ],
)
def test_a_bad_replica_is_named(address, message):
    with pytest.raises(ValueError, match=message):
        replica_target(address)
