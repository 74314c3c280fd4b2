"""What a broken barrier says about who is missing."""

from nanodist.services.barrier.state import Barrier


def test_a_generation_in_progress_names_the_members_that_have_not_arrived():
    barrier = Barrier("b", parties=3, arrived={"w0": 0}, known={"w0", "w1", "w2"})
    assert barrier.describe_missing() == "missing 2 of 3: w1, w2"


def test_a_barrier_broken_before_anyone_waited_names_its_members_without_counting():
    barrier = Barrier("b", known={"w1", "w0"})
    assert barrier.describe_missing() == "no one was waiting; its members: w0, w1"
