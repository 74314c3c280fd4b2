"""One declaration per worker setting: flags, NANODIST_* variables, TOML and `nanodist up`'s pass-through agree."""

import argparse
import os
import re
import sys
from dataclasses import fields

import pytest

from nanodist.workers import launcher, train
from nanodist.workers.config import SecurityFlags, TrainConfig
from nanodist.workers.settings import declared, from_args, to_argv

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A value other than the default for every setting that `nanodist up` passes on to its workers.
NON_DEFAULT = {
    "--run-id": "r-1",
    "--runs-dir": "/tmp/elsewhere",
    "--flat": None,
    "--mode": "ssp",
    "--staleness": "3",
    "--epochs": "2",
    "--batch-size": "8",
    "--lr": "0.05",
    "--hidden": "32,16",
    "--seed": "9",
    "--max-steps": "7",
    "--slow-ms": "5",
    "--join-window": "1.5",
    "--elastic": None,
    "--dump-params": "/tmp/p.npz",
    "--timeout": "30",
    "--min-workers": "2",
    "--max-workers": "4",
    "--regroup-window": "0.5",
    "--session-ttl": "12.5",
    "--pipeline-stages": "2",
    "--micro-batches": "2",
    "--schedule": "gpipe",
    "--pipeline-split": "2,1",
}


@pytest.fixture(autouse=True)
def no_nanodist_environment(monkeypatch):
    for name in list(os.environ):
        if name.startswith("NANODIST_"):
            monkeypatch.delenv(name)


def parser_of(add_arguments) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser


def as_argv(values: dict[str, str | None]) -> list[str]:
    return [part for flag, value in values.items() for part in ([flag] if value is None else [flag, value])]


def test_the_launcher_passes_every_training_setting_to_its_workers():
    passed = {d.setting.flag for d in declared(TrainConfig) if d.name not in launcher.PLACED}
    assert set(NON_DEFAULT) == passed, "a new setting needs a non-default value here"

    args = parser_of(launcher.add_arguments).parse_args(as_argv(NON_DEFAULT))
    _, config = launcher.settings(args)
    placed = launcher.worker_config(config, [("tcp", 2)], 0, ["h:1", "h:2"], "h:3", "h:4")
    argv = launcher.worker_argv(placed)
    assert argv[:4] == [sys.executable, "-m", "nanodist.workers.cli", "worker"]

    received = from_args(TrainConfig, parser_of(train.add_arguments).parse_args(argv[4:]))
    assert received == placed
    defaults = TrainConfig(run_id="default")
    for d in declared(TrainConfig):
        if d.name not in launcher.PLACED:
            assert getattr(received, d.name) != getattr(defaults, d.name), d.setting.flag
    assert received.pipeline_split == (2, 1) and received.hidden == (32, 16) and received.learning_rate == 0.05
    # An elastic group counts its members as they come.
    assert (received.ps, received.backend, received.group_id, received.num_groups, received.group_size) == (
        ("h:1", "h:2"),
        "tcp",
        0,
        1,
        0,
    )


def test_a_settings_file_lies_beneath_the_flags(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'pipeline_split = [3, 1]\nlr = 0.1\nhidden = "32,32,16"\nflat = true\ngroups = "tcp:2"\nshards = 1\n'
    )
    args = parser_of(launcher.add_arguments).parse_args(["--config", str(path), "--lr", "0.2"])
    launch, config = launcher.settings(args)
    assert (launch.groups, launch.shards) == ("tcp:2", 1)
    assert config.pipeline_split == (3, 1) and config.hidden == (32, 32, 16) and config.flat
    assert config.learning_rate == 0.2, "the flag wins over the file"
    assert config.run_id.startswith("run-")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("epoch = 3\n", "unknown settings ['epoch']"),
        ('backend = "tcp"\n', "unknown settings ['backend']"),  # the launcher places groups itself
        ('epochs = "many"\n', "epochs: expected an integer, got 'many'"),
        ('schedule = "zigzag"\n', "schedule must be one of ['1f1b', 'gpipe']"),
        ("flat = 1\n", "flat must be true or false"),
    ],
)
def test_a_bad_settings_file_is_refused_naming_the_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    args = parser_of(launcher.add_arguments).parse_args(["--config", str(path)])
    with pytest.raises(launcher.LaunchError, match=re.escape(message)):
        launcher.settings(args)


def test_environment_variables_are_the_worker_defaults(monkeypatch):
    monkeypatch.setenv("NANODIST_RUN_ID", "from-env")
    monkeypatch.setenv("NANODIST_PS", "a:1,b:2")
    monkeypatch.setenv("NANODIST_BARRIER_ADDRESS", "barrier:1")
    monkeypatch.setenv("NANODIST_LR", "0.01")
    monkeypatch.setenv("NANODIST_FLAT", "1")
    monkeypatch.setenv("NANODIST_PIPELINE_SPLIT", "1,2")
    monkeypatch.setenv("NANODIST_TLS_CA", "/ca.pem")
    args = parser_of(train.add_arguments).parse_args(["--lr", "0.5"])
    config = from_args(TrainConfig, args)
    assert (config.run_id, config.ps, config.barrier, config.flat) == ("from-env", ("a:1", "b:2"), "barrier:1", True)
    assert config.pipeline_split == (1, 2) and config.learning_rate == 0.5
    assert from_args(SecurityFlags, args).client_security().ca == "/ca.pem"


def test_a_bad_environment_variable_is_named(monkeypatch, capsys):
    monkeypatch.setenv("NANODIST_EPOCHS", "ten")
    with pytest.raises(SystemExit):
        parser_of(train.add_arguments)
    assert "NANODIST_EPOCHS='ten': expected an integer" in capsys.readouterr().err


def test_to_argv_round_trips_values_that_look_like_flags():
    config = TrainConfig(run_id="-odd", hidden=(), dump_params="", seed=-1)
    parsed = from_args(TrainConfig, parser_of(train.add_arguments).parse_args(to_argv(config)))
    assert parsed == config


def test_the_compose_files_name_only_declared_variables():
    variables = {d.setting.variable for cls in (TrainConfig, SecurityFlags) for d in declared(cls)}
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        block = re.search(r"x-worker-env: &worker-env\n((?:  .*\n)+)", f.read())
    assert block
    plain = set(re.findall(r"(NANODIST_[A-Z_]+):", block.group(1)))
    with open(os.path.join(ROOT, "docker-compose.tls.yml")) as f:
        tls = set(re.findall(r"\n      (NANODIST_[A-Z_]+):", f.read()))  # the worker and mpi-group entries
    assert plain and tls
    assert plain | tls <= variables, (plain | tls) - variables


def test_every_field_of_the_worker_settings_is_declared():
    for cls in (TrainConfig, SecurityFlags):
        assert {f.name for f in fields(cls)} == {d.name for d in declared(cls)}


def test_a_process_without_flags_reads_the_same_variables(monkeypatch):
    from nanodist.workers.settings import SettingError, from_environment

    with pytest.raises(SettingError, match="NANODIST_RUN_ID must be set"):
        from_environment(TrainConfig)
    monkeypatch.setenv("NANODIST_RUN_ID", "job")
    monkeypatch.setenv("NANODIST_GROUP_SIZE", "3")
    monkeypatch.setenv("NANODIST_FLAT", "yes")
    config = from_environment(TrainConfig, backend="tcp")
    assert (config.run_id, config.group_size, config.flat, config.backend, config.epochs) == ("job", 3, True, "tcp", 10)
    monkeypatch.setenv("NANODIST_TIMEOUT", "soon")
    with pytest.raises(SettingError, match="NANODIST_TIMEOUT='soon': expected a number"):
        from_environment(TrainConfig)
