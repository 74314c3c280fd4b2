import os

import numpy as np

from nanodist.client import ParameterServerClient, adam

GRADS = [np.full(5, 0.5, np.float32), np.arange(5, dtype=np.float32), np.full(5, -1.0, np.float32)]


def test_sigterm_checkpoints_and_a_restart_restores_values_versions_and_optimizer_state(start_server, tmp_path):
    ckpt = str(tmp_path / "ckpt")
    restarted = start_server("ps", "--checkpoint-dir", ckpt)
    reference = start_server("ps")
    clients = [ParameterServerClient([s.address]) for s in (restarted, reference)]
    for client in clients:
        client.init({"w": np.ones(5, np.float32)}, adam(0.1))
        for grad in GRADS[:2]:
            client.push({"w": grad})
    assert restarted.stop() == 0
    assert sorted(os.listdir(ckpt)) == ["ckpt-00000001"]
    clients[0].close()
    again = start_server("ps", "--checkpoint-dir", ckpt, port=restarted.port)
    clients[0] = ParameterServerClient([again.address])
    assert clients[0].pull(["w"]).versions == {"w": 2}
    for client in clients:  # Adam's moments and step count must have survived for these to agree
        client.push({"w": GRADS[2]})
    np.testing.assert_array_equal(clients[0].pull(["w"])["w"], clients[1].pull(["w"])["w"])


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(start_server, tmp_path):
    ckpt = tmp_path / "ckpt"
    server = start_server("ps", "--checkpoint-dir", str(ckpt))
    with ParameterServerClient([server.address]) as client:
        client.init({"w": np.zeros(1000, np.float32)})
        client.push({"w": np.ones(1000, np.float32)})
    server.stop()
    server = start_server("ps", "--checkpoint-dir", str(ckpt), port=server.port)
    with ParameterServerClient([server.address]) as client:
        client.push({"w": np.ones(1000, np.float32)})
    server.stop()
    newest = ckpt / "ckpt-00000002" / "k0.value.npy"
    data = bytearray(newest.read_bytes())
    data[-1] ^= 0xFF  # flip a bit in the values
    newest.write_bytes(bytes(data))
    server = start_server("ps", "--checkpoint-dir", str(ckpt), port=server.port)
    with ParameterServerClient([server.address]) as client:
        values = client.pull(["w"])
    assert values.versions == {"w": 1} and values["w"][0] == np.float32(-0.01)
    log = (tmp_path / f"ps-{server.port}.log").read_text()
    assert "ckpt-00000002 is damaged (k0.value.npy does not match its checksum)" in log
