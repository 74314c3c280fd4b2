"""docker-compose.torch.yml sets only variables that nd.init() reads: a misspelt one would be ignored."""

import os
import re

from nanodist.workers.config import JobConfig
from nanodist.workers.settings import declared
from tests.conftest import ROOT


def test_the_torch_override_names_only_the_job_variables():
    variables = {d.setting.variable for d in declared(JobConfig)}
    with open(os.path.join(ROOT, "docker-compose.torch.yml")) as f:
        named = set(re.findall(r"^ +(NANODIST_[A-Z_]+):", f.read(), re.MULTILINE))
    assert {"NANODIST_BACKEND", "NANODIST_GROUP_ID", "NANODIST_GROUP_SIZE"} <= named
    assert named <= variables, named - variables
