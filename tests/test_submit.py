"""`karlo submit` and `karlo jobs` against a real Ray head (`ray start --head` with the dashboard, on 127.0.0.1,
with token authentication), started by the tests in its own process group and killed with it."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from click.testing import CliRunner
from pipeline_utils import PROMPTS, read_output, write_table
from ray_cluster import free_ports, worker_port_range

from jobs.cli import main
from jobs.submit import PACKAGES, entrypoint, runtime_env

KARLO = str(Path(sys.executable).with_name("karlo"))
FEW_STEPS = ["--prior-steps", "3", "--decoder-steps", "3", "--super-res-steps", "2"]


class RayHead:
    def __init__(self, address: str, client_env: dict[str, str]):
        self.address = address
        self.client_env = client_env

    def karlo(self, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([KARLO, *args], env=env or self.client_env, capture_output=True, text=True,
                              timeout=timeout)


@pytest.fixture(scope="module")
def ray_head(tiny_model, aws_env):
    """A 2-CPU Ray head with the dashboard and token authentication. Its token is in a file of its own, so the
    test neither reads nor changes ~/.ray. Never stopped with `ray stop`: its process group is killed."""
    # A short temp dir: Ray's Unix socket paths must stay under ~100 characters.
    temp = Path(tempfile.mkdtemp(prefix="kr-", dir="/tmp"))
    token = temp / "auth_token"
    token.write_text(secrets.token_hex(32))
    components = free_ports(9)
    gcs, dashboard, client, agent, agent_grpc, runtime_env_port, metrics, objects, nodes = components
    workers = worker_port_range(components)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           # The job's `python` is this environment's, as on a cluster built from infra/Dockerfile.
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block", "--disable-usage-stats",
           "--node-ip-address", "127.0.0.1", "--port", str(gcs), "--include-dashboard", "true",
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--num-cpus", "2",
           "--temp-dir", str(temp / "ray"), "--ray-client-server-port", str(client),
           "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
           "--runtime-env-agent-port", str(runtime_env_port), "--metrics-export-port", str(metrics),
           "--object-manager-port", str(objects), "--node-manager-port", str(nodes),
           "--min-worker-port", str(workers), "--max-worker-port", str(workers + 200)]
    log = open(temp / "head.log", "w")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 240
        while True:
            assert proc.poll() is None, (temp / "head.log").read_text()[-5000:]
            try:
                request = urllib.request.Request(f"{address}/api/version",
                                                 headers={"Authorization": f"Bearer {token.read_text()}"})
                with urllib.request.urlopen(request, timeout=5):
                    break
            except OSError:
                assert time.time() < deadline, "the Ray dashboard did not come up"
                time.sleep(1)
        yield RayHead(address, {k: v for k, v in env.items() if k != "RAY_API_SERVER_ADDRESS"})
    finally:
        with contextlib.suppress(ProcessLookupError):  # a head that failed to start left no group behind
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        # `ray start --block` may be gone before all of its children: kill whatever is left of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


def job_id_of(stderr: str) -> str:
    return re.search(r"submitted job (\S+)", stderr).group(1)


@pytest.mark.slow
def test_submit_generate_on_the_tiny_model(ray_head, tmp_path):
    table = write_table(tmp_path / "prompts.parquet", prompt=PROMPTS[:3], id=["a", "b", "c"])
    out = tmp_path / "out"
    proc = ray_head.karlo("submit", "--address", ray_head.address, "--", "generate", str(table), str(out),
                          *FEW_STEPS)
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-5000:]
    job_id = job_id_of(proc.stderr)
    # The job's own output, streamed back: the generate summary printed on the cluster.
    assert "images written   3" in proc.stdout and "error rows       0" in proc.stdout
    assert f"job {job_id} SUCCEEDED" in proc.stderr
    result = read_output(out)
    assert sorted(result.keys) == ["a", "b", "c"] and (out / "_SUCCESS").is_file()

    status = ray_head.karlo("jobs", "status", "--address", ray_head.address, job_id)
    assert status.returncode == 0 and f"job {job_id}: SUCCEEDED" in status.stdout
    logs = ray_head.karlo("jobs", "logs", "--address", ray_head.address, job_id)
    assert logs.returncode == 0 and "images written   3" in logs.stdout


@pytest.mark.slow
def test_failing_job_exit_code_and_logs(ray_head, tmp_path):
    proc = ray_head.karlo("submit", "--address", ray_head.address, "--", "generate", str(tmp_path / "nope.parquet"),
                          str(tmp_path / "out"), *FEW_STEPS)
    # generate's own exit code for unusable input, and its message, come back through the job.
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"error: input does not exist: {tmp_path / 'nope.parquet'}" in proc.stdout
    job_id = job_id_of(proc.stderr)
    assert f"job {job_id} FAILED (exit code 2)" in proc.stderr
    status = ray_head.karlo("jobs", "status", "--address", ray_head.address, job_id)
    assert status.returncode == 2 and "FAILED" in status.stdout


@pytest.mark.slow
def test_no_wait_submission_id_and_stop(ray_head, tmp_path):
    table = write_table(tmp_path / "prompts.parquet", prompt=PROMPTS)
    args = ["submit", "--address", ray_head.address, "--submission-id", "karlo-test-001", "--no-wait", "--",
            "generate", str(table), str(tmp_path / "out"), "--prior-steps", "200", "--decoder-steps", "200"]
    first = ray_head.karlo(*args)
    assert first.returncode == 0 and first.stdout.strip() == "karlo-test-001", first.stderr
    second = ray_head.karlo(*args)
    assert second.returncode == 1 and "the cluster refused the job" in second.stderr
    assert "karlo-test-001 already exists" in second.stderr
    stop = ray_head.karlo("jobs", "stop", "--address", ray_head.address, "karlo-test-001")
    assert stop.returncode == 0 and "job karlo-test-001: STOPPED" in stop.stdout, stop.stdout + stop.stderr
    status = ray_head.karlo("jobs", "status", "--address", ray_head.address, "karlo-test-001")
    assert status.returncode == 1 and "STOPPED" in status.stdout


@pytest.mark.slow
def test_cluster_errors_are_clear(ray_head):
    env = {k: v for k, v in ray_head.client_env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    proc = ray_head.karlo("submit", "--address", ray_head.address, "--", "make-tiny-model", "/tmp/x", env=env)
    assert proc.returncode == 1 and "refused the request" in proc.stderr and "token" in proc.stderr
    assert "needs RAY_AUTH_MODE=token here too, with its token in RAY_AUTH_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = ray_head.karlo("jobs", "status", "--address", ray_head.address, "raysubmit_nope")
    assert missing.returncode == 1 and "no job raysubmit_nope" in missing.stderr
    port = free_ports(1)[0]
    down = ray_head.karlo("jobs", "status", "--address", f"http://127.0.0.1:{port}", "x")
    assert down.returncode == 1 and "cannot reach the Ray dashboard" in down.stderr


def test_relative_paths_need_the_working_dir_they_are_relative_to(tmp_path, monkeypatch):
    """A relative path in the command resolves on the cluster only inside an uploaded --working-dir."""
    monkeypatch.chdir(tmp_path)
    Path("prompts.parquet").write_bytes(b"")
    Path("configs").mkdir()
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--address", "http://127.0.0.1:1", "--", "generate", "prompts.parquet",
                                  "s3://b/out", "--stage-config", "configs", "--device", "cpu"])
    assert result.exit_code == 2
    assert "prompts.parquet, configs: relative to this folder, which the job on the cluster does not have; pass " \
           "--working-dir . to upload" in result.output
    # With --working-dir the command goes on to the cluster (here: none answers).
    result = runner.invoke(main, ["submit", "--address", "http://127.0.0.1:1", "--working-dir", ".", "--",
                                  "generate", "prompts.parquet", "s3://b/out"])
    assert result.exit_code == 1 and "cannot reach the Ray dashboard" in result.output


def test_the_command_a_job_runs_names_itself_karlo():
    """Jobs run `python -m jobs.cli`; its usage errors still read as the user's `karlo` command."""
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "generate"], capture_output=True, text=True)
    assert proc.returncode == 2 and "Usage: karlo generate" in proc.stderr, proc.stderr


def test_usage_errors():
    runner = CliRunner()
    result = runner.invoke(main, ["submit", "--address", "http://127.0.0.1:1", "--", "sweeep", "x"])
    assert result.exit_code == 2 and "'sweeep' is not a karlo command that can run as a job" in result.output
    result = runner.invoke(main, ["submit", "--address", "http://127.0.0.1:1", "--", "submit", "x"])
    assert result.exit_code == 2 and "is not a karlo command" in result.output
    result = runner.invoke(main, ["submit", "--address", "http://127.0.0.1:1", "--env", "NOEQUALS", "--",
                                  "generate", "a", "b"])
    assert result.exit_code == 2 and "--env expects NAME=VALUE" in result.output
    result = runner.invoke(main, ["submit", "--", "generate", "a", "b"], env={"RAY_ADDRESS": "",
                                                                               "RAY_API_SERVER_ADDRESS": ""})
    assert result.exit_code == 2 and "no cluster address" in result.output


def test_runtime_env_and_entrypoint(tmp_path):
    env = runtime_env(upload_code=True, working_dir=str(tmp_path), pip=["six==1.17.0"], env_vars={"A": "1"})
    assert [Path(p).name for p in env["py_modules"]] == list(PACKAGES)
    assert all((Path(p) / "__init__.py").is_file() for p in env["py_modules"])
    assert env["working_dir"] == str(tmp_path) and env["pip"] == ["six==1.17.0"] and env["env_vars"] == {"A": "1"}
    assert {".venv", "out", "__pycache__", ".git"} <= set(env["excludes"])
    assert runtime_env(upload_code=False, working_dir=None, pip=[], env_vars={}) == {}
    assert entrypoint(["generate", "s3://b/in", "out dir", "--seed", "1"]) == \
        "python -m jobs.cli generate s3://b/in 'out dir' --seed 1"
