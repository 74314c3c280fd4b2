"""The .proto contract: documented, reflected in docs/api.md, and compatible with the v1 baseline."""

import os
import shutil
import sys

import pytest
from google.protobuf import descriptor_pb2

from tests.conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "protos"))
import apitools  # noqa: E402


@pytest.fixture(scope="module")
def current() -> descriptor_pb2.FileDescriptorSet:
    return apitools.compile_protos()


def baseline() -> descriptor_pb2.FileDescriptorSet:
    with open(apitools.BASELINE, "rb") as f:
        return descriptor_pb2.FileDescriptorSet.FromString(f.read())


def test_every_element_is_documented_and_enums_start_unspecified(current):
    assert apitools.undocumented(current) == []


def test_api_reference_is_current(current):
    with open(apitools.DOCS) as f:
        assert f.read() == apitools.render(current), "docs/api.md is stale: run `make docs`"


def test_api_reference_gives_errors_and_idempotency_for_every_rpc(current):
    text = apitools.render(current)
    sections = text.split("#### `")[1:]
    assert len(sections) >= 25
    for section in sections:
        body = section.split("\n###")[0]
        assert "idempoten" in body.lower() or "read-only" in body.lower(), section[:80]


def test_the_protos_are_compatible_with_the_baseline(current):
    assert apitools.breaking_changes(baseline(), current) == []


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        ("  int64 step = 3;", "  double step = 3;", "PushRequest.step changed type int64 -> double"),
        ("  string request_id = 4;", "  string request_id = 9;", "PushRequest.request_id (field 4) was removed"),
        ("  int32 worker_id = 2;", "  int32 worker = 2;", "field 2 was renamed worker_id -> worker"),
        ("  rpc Stats(StatsRequest) returns (StatsResponse);", "", "ParameterServer.Stats was removed"),
    ],
)
def test_a_breaking_edit_is_caught(tmp_path, old, new, problem):
    shutil.copytree(
        os.path.join(ROOT, "protos", "nanodist"),
        tmp_path / "nanodist",
        ignore=shutil.ignore_patterns("*.py", "*.pyi", "*.binpb", "__pycache__"),
    )
    path = tmp_path / "nanodist" / "v1" / "parameter_server.proto"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    problems = apitools.breaking_changes(baseline(), apitools.compile_protos(str(tmp_path)))
    assert any(problem in p for p in problems), problems


def test_removing_a_field_is_fine_once_its_number_is_reserved(tmp_path):
    shutil.copytree(
        os.path.join(ROOT, "protos", "nanodist"),
        tmp_path / "nanodist",
        ignore=shutil.ignore_patterns("*.py", "*.pyi", "*.binpb", "__pycache__"),
    )
    path = tmp_path / "nanodist" / "v1" / "parameter_server.proto"
    text = path.read_text().replace("  int64 fencing_token = 5;\n}", '  reserved 5;\n  reserved "fencing_token";\n}', 1)
    path.write_text(text)
    assert apitools.breaking_changes(baseline(), apitools.compile_protos(str(tmp_path))) == []
