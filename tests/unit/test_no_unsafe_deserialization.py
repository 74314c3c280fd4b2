"""Nothing from the network or from disk is ever unpickled or evaluated."""

import os
import re

from tests.conftest import ROOT

PACKAGES = ["services", "client", "workers", os.path.join("protos", "nanodist")]
FORBIDDEN = re.compile(
    r"\b(import|from)\s+(pickle|cPickle|dill|cloudpickle|marshal|shelve)\b"
    r"|\b(pickle|dill|cloudpickle|marshal)\.(loads?|Unpickler)\b"
    r"|(?<![\w.])(eval|exec)\("
    r"|allow_pickle\s*=\s*True"
    r"|yaml\.(unsafe_)?load\("
)


def test_the_package_never_unpickles_or_evaluates():
    hits = []
    for package in PACKAGES:
        for directory, _, files in os.walk(os.path.join(ROOT, package)):
            for name in files:
                if name.endswith(".py") and not name.endswith(("_pb2.py", "_pb2_grpc.py")):
                    path = os.path.join(directory, name)
                    with open(path) as f:
                        for number, line in enumerate(f, 1):
                            if FORBIDDEN.search(line):
                                hits.append(f"{os.path.relpath(path, ROOT)}:{number}: {line.strip()}")
    assert hits == []
