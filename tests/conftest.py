"""Shared fixtures: a local S3 server (moto) with a fresh bucket per test, and a local Ray started on demand."""

from __future__ import annotations

import dataclasses
import logging
import uuid

import pytest
from pipeline_utils import session_environment

# Dummy credentials: tests must never pick up real ones, and botocore refuses to sign without any.
_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@pytest.fixture(scope="session")
def aws_env():
    """Dummy AWS credentials for the session, set before any S3 client or Ray worker process starts."""
    with pytest.MonkeyPatch.context() as mp:
        for name, value in _AWS_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield


@pytest.fixture(scope="session")
def s3_server(aws_env):
    """A moto S3 server on an ephemeral 127.0.0.1 port; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@dataclasses.dataclass
class S3Bucket:
    url: str  # "s3://<bucket>"
    endpoint: str
    storage_options: dict
    fs: object  # s3fs.S3FileSystem for this endpoint


@pytest.fixture
def s3_bucket(s3_server):
    """A new, empty bucket on the session's S3 server."""
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    storage_options = {"client_kwargs": {"endpoint_url": s3_server}}
    fs = s3fs.S3FileSystem(**storage_options)
    name = f"test-{uuid.uuid4().hex}"
    fs.mkdir(name)
    yield S3Bucket(url=f"s3://{name}", endpoint=s3_server, storage_options=storage_options, fs=fs)


@pytest.fixture(scope="session", autouse=True)
def karlo_env():
    """Every cache (models, digests, Hugging Face) in a scratch folder for the session, set before Ray starts."""
    yield from session_environment()


@pytest.fixture(scope="session")
def tiny_model(karlo_env) -> str:
    """The embedded default model (the tiny random preset), built once into the session's KARLO_CACHE."""
    from pipeline.embedded import default_model

    return default_model()


@pytest.fixture(scope="session")
def tiny_variations_model(karlo_env) -> str:
    """The embedded image-variations model: the tiny model's components, no prior, a tiny CLIP vision tower."""
    from pipeline.embedded import default_model

    return default_model(variations=True)


@pytest.fixture(scope="session")
def ray_local(aws_env, karlo_env):
    """A local 2-CPU Ray for the rest of the session. Its workers inherit the environment of this process at
    start, so the dummy AWS credentials are set first."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()


@dataclasses.dataclass
class GeneratedRun:
    root: object  # pathlib.Path of the output folder
    result: object  # click.testing.Result: stdout has the summary table, stderr the progress lines


@pytest.fixture(scope="session")
def generated_run(tmp_path_factory, ray_local, tiny_model) -> GeneratedRun:
    """`karlo generate` of six prompts (one empty, so one error row) through the CLI, one row per shard and a
    status line every half second: a real run for the progress and preview tests."""
    from click.testing import CliRunner
    from pipeline_utils import PROMPTS, STEPS, write_table

    from jobs.cli import main

    tmp = tmp_path_factory.mktemp("generated")
    prompts = PROMPTS[:3] + [""] + PROMPTS[3:5]
    table = write_table(tmp / "prompts.parquet", id=[f"row-{i}" for i in range(6)], prompt=prompts,
                        seed=list(range(900, 906)))
    steps = [arg for name, value in STEPS.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    result = CliRunner().invoke(main, ["generate", str(table), str(tmp / "out"), "--model", tiny_model, *steps,
                                       "--rows-per-shard", "1", "--progress-interval", "0.5"])
    return GeneratedRun(root=tmp / "out", result=result)
