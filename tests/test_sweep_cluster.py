"""`optimize sweep --address`: a Ray head started here on 127.0.0.1 (`ray start --head`), a sweep joined to it from
a separate `optimize` process, the head stopped again; the points equal an in-process run of the same spec."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from optimizer.sweep import run, without_timings

ROOT = Path(__file__).resolve().parents[1]
RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cluster_env() -> dict[str, str]:
    """Loopback only (Ray's switch), token auth as a real cluster has it, no usage report, no drain wait on stop,
    and workers that import this checkout."""
    return {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "token",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
            "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """`ray start --head --block` on 127.0.0.1 with 2 CPUs; yields its address; SIGTERM stops it at the end."""
    if not RAY.exists():
        pytest.fail(f"{RAY} is missing: install the [dist] extra (ray)")
    port = free_port()
    log = tmp_path_factory.mktemp("ray-head") / "head.log"
    with open(log, "w") as out:
        head = subprocess.Popen(
            [str(RAY), "start", "--head", "--block", f"--port={port}", "--node-ip-address=127.0.0.1",
             "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"],
            stdout=out, stderr=subprocess.STDOUT, env=cluster_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start --head did not come up:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield f"127.0.0.1:{port}"
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the group this fixture started, nothing else
            head.wait()


def test_sweep_joins_a_running_cluster_and_matches_the_in_process_run(ray_head, digits_assets, tmp_path):
    for name in ("model", "calibration", "eval"):
        source = getattr(digits_assets, name)
        (tmp_path / source.name).write_bytes(source.read_bytes())
    spec = {"model": digits_assets.model.name, "eval": digits_assets.eval.name,
            "calibration": digits_assets.calibration.name,
            "passes": ["structured-sparse:ratio={ratio},criterion={criterion}"],
            "axes": {"ratio": [0.25, 0.5], "criterion": ["l1", "hoyer"]}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    report = tmp_path / "r.json"
    done = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", "sweep", str(tmp_path / "spec.yaml"), "--address", ray_head,
         "--report", str(report)], env=cluster_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(report.read_text())
    assert result["backend"] == f"ray cluster {ray_head}" and result["workers"] == 2
    here = run(tmp_path / "spec.yaml")
    assert without_timings(result["points"]) == without_timings(here["points"])
    assert [p["params"] for p in result["points"]] == [{"ratio": r, "criterion": c} for r in (0.25, 0.5)
                                                       for c in ("l1", "hoyer")]
    assert all(p["ok"] for p in result["points"])


def test_a_wrong_address_is_one_line_and_exit_2(tmp_path, digits_assets):
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({"model": str(digits_assets.model), "passes": ["cleanup"]}))
    done = subprocess.run(
        [sys.executable, "-m", "optimizer.cli", "sweep", str(spec), "--address", f"127.0.0.1:{free_port()}"],
        env=cluster_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "cannot join the Ray cluster" in done.stderr and "Traceback" not in done.stderr
