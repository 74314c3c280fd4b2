"""RankLines: whole lines, each under the rank that is current when the line ends."""

from __future__ import annotations

import os

from nanodist.workers.rank_output import RankLines


def test_pieces_become_whole_prefixed_lines_and_a_last_partial_line_is_written_at_finish():
    read_end, write_end = os.pipe()
    rank = [3]
    with open(write_end, "w") as original:
        lines = RankLines(original, lambda: rank[0])
        lines.write("epoch 1:")
        lines.flush()  # a partial line is held, not written
        lines.write(" loss 0.5\nepoch 2:")
        rank[0] = 5  # an elastic job's new generation
        lines.write(" loss 0.4\n\nno end")
        lines.finish()
        lines.write("after\n")
    with open(read_end) as reader:
        assert reader.read() == (
            "[rank 3] epoch 1: loss 0.5\n[rank 5] epoch 2: loss 0.4\n[rank 5] \n[rank 5] no end\n[rank 5] after\n"
        )
