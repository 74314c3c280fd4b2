"""Every launcher gives each service a port that no other process holds: the server binds port 0 itself
and reports the port it got (--port-file), so no port is picked, closed and then taken by another."""

from __future__ import annotations

import pytest

from nanodist.workers.launcher import Cluster
from tests.conftest import health_status

pytestmark = pytest.mark.slow  # trains, or runs the whole cluster: make test, not test-fast


def test_many_services_launched_in_a_row_each_hold_a_port_of_their_own():
    cluster = Cluster()
    try:
        addresses = [cluster.serve(f"barrier-{i}", "barrier", [], timeout=60) for i in range(8)]
        addresses += [
            cluster.serve(f"ps-{i}", "ps", ["--mode", "bsp", "--num-workers", "2"], timeout=60) for i in range(4)
        ]
        assert len(set(addresses)) == len(addresses), addresses
        assert all(health_status(a, timeout=5) == 1 for a in addresses)  # SERVING, each its own process
        assert all(child.process.poll() is None for child in cluster.children)
    finally:
        cluster.stop()
