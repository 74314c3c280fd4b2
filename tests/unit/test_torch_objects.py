"""broadcast_object's encoding: values come back as they went, and nothing is pickled either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanodist.torch import objects


def test_json_values_tensors_and_arrays_round_trip_with_their_types():
    value = {
        "epoch": 3,
        "lrs": (0.1, 0.01),
        7: [None, True, "x"],
        ("a", 1): {"nested": torch.arange(4, dtype=torch.int64)},
        "half": torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        "array": np.arange(6, dtype=np.float32).reshape(2, 3),
    }
    back = objects.decode(objects.encode(value))
    assert back["epoch"] == 3 and back["lrs"] == (0.1, 0.01) and back[7] == [None, True, "x"]
    assert torch.equal(back[("a", 1)]["nested"], value[("a", 1)]["nested"])
    assert back["half"].dtype == torch.bfloat16 and torch.equal(back["half"], value["half"])
    np.testing.assert_array_equal(back["array"], value["array"])


@pytest.mark.parametrize("value", [{1, 2}, {"k": object()}, [np.array([object()])]])
def test_what_json_cannot_say_is_refused_naming_its_type(value):
    with pytest.raises(objects.NotSendable, match="cannot be sent"):
        objects.encode(value)


def test_an_archive_holding_a_pickled_array_is_refused_on_reading():
    import io

    out = io.BytesIO()
    np.savez(out, skeleton=np.frombuffer(b'{"__array__": 0}', dtype=np.uint8), a0=np.array([object()], dtype=object))
    with pytest.raises(ValueError, match="allow_pickle"):
        objects.decode(out.getvalue())
