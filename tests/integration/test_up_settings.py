"""Settings given to `nanodist up`, as flags or in its TOML file, reach every worker of the run."""

import json
import subprocess
import uuid

from tests.conftest import nanodist_command


def test_settings_passed_to_up_land_in_the_runs_config(tmp_path):
    run_id = f"settings-{uuid.uuid4().hex[:8]}"
    settings = tmp_path / "run.toml"
    settings.write_text('schedule = "gpipe"\nmicro_batches = 2\nshards = 1\ngroups = "tcp:2"\n')
    dump = tmp_path / "params.npz"
    result = subprocess.run(
        nanodist_command(
            "up",
            *("--config", str(settings), "--run-id", run_id, "--runs-dir", str(tmp_path)),
            *("--pipeline-stages", "2", "--hidden", "32,32,16", "--pipeline-split", "1,3"),
            *("--epochs", "1", "--max-steps", "3", "--seed", "4", "--slow-ms", "1", "--join-window", "1.5"),
            *("--dump-params", str(dump)),
        ),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = json.loads((tmp_path / run_id / "metrics.json").read_text())
    config = metrics["config"]
    assert config["pipeline_split"] == [1, 3], "--pipeline-split reaches the workers"
    assert (config["schedule"], config["micro_batches"]) == ("gpipe", 2), "so do the file's settings"
    assert (config["seed"], config["slow_ms"], config["join_window"], config["hidden"]) == (4, 1, 1.5, [32, 32, 16])
    assert (config["backend"], config["group_size"], config["num_groups"], len(config["ps"])) == ("tcp", 2, 1, 1)
    assert dump.exists()
    stages = {w["stage"] for w in metrics["timings"]["per_worker"].values()}
    assert stages == {0, 1} and metrics["world_size"] == 2
