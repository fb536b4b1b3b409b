"""Run ``karlo`` commands as Ray jobs on a cluster (``karlo submit``, ``karlo jobs status|logs|stop``).

A job runs ``python -m jobs.cli <command> ...`` on the cluster's head. Unless told that the cluster image already
has this package (``--no-upload``), the job's runtime_env uploads the three packages of this project as
``py_modules`` (a few MB: the code and the CLIP vocabulary), so the cluster runs exactly the code the user has;
the cluster's Python must already have the dependencies (torch, transformers, ray[data]: the image in infra/).

The exit code of ``karlo submit`` is the job's: 0 when it succeeded, the command's own exit code when it failed
(2 unusable input or settings, 3 some rows became error rows), 1 when it failed without one (runtime_env set-up,
a crashed driver) or was stopped.
"""

from __future__ import annotations

import asyncio
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import click

PACKAGES = ("karlo_model", "pipeline", "jobs")
# Never uploaded: environments, outputs and caches that may sit inside a --working-dir.
UPLOAD_EXCLUDES = [".git", ".venv", "venv", "out", "__pycache__", "*.pyc", ".pytest_cache", "*.egg-info", ".ruff_cache"]
EXIT_JOB_FAILED = 1
POLL_SECONDS = 1.0
# Commands whose driver only plans and writes: their GPUs belong to the stage actor pools.
PIPELINE_COMMANDS = ("generate", "sweep")
# Commands that talk to a cluster or to Kubernetes from outside: never run as jobs themselves.
NOT_JOBS = ("submit", "jobs", "render-k8s", "launch-rayjob")


class SubmitError(RuntimeError):
    """The cluster could not be reached or refused the request; the message says why."""


def runtime_env(*, upload_code: bool, working_dir: str | None, pip: Sequence[str],
                env_vars: dict[str, str]) -> dict:
    """The job's runtime_env: this project's packages (unless the image has them), the user's working dir,
    extra pip packages and environment variables."""
    env: dict = {}
    if upload_code:
        import jobs

        root = Path(jobs.__file__).resolve().parents[1]
        env["py_modules"] = [str(root / name) for name in PACKAGES]
    if working_dir:
        if not Path(working_dir).is_dir():
            raise click.UsageError(f"--working-dir {working_dir} is not a directory")
        env["working_dir"] = str(Path(working_dir).resolve())
    if upload_code or working_dir:
        env["excludes"] = list(UPLOAD_EXCLUDES)
    if pip:
        env["pip"] = list(pip)
    if env_vars:
        env["env_vars"] = dict(env_vars)
    return env


def relative_paths(command: Sequence[str]) -> list[str]:
    """Arguments of ``command`` that are relative paths of files or folders here. The job runs in a folder of its
    own on the cluster, where they resolve only inside an uploaded --working-dir."""
    return [arg for arg in command[1:]
            if not arg.startswith("-") and "://" not in arg and not os.path.isabs(arg) and os.path.exists(arg)]


def entrypoint(command: Sequence[str]) -> str:
    """The shell command the cluster runs: the same ``karlo`` command, through the module so that no console
    script needs to be installed there."""
    return "python -m jobs.cli " + shlex.join(command)


def client(address: str | None):
    """A JobSubmissionClient for the dashboard at ``address`` (default: $RAY_API_SERVER_ADDRESS, then
    $RAY_ADDRESS). Token authentication follows Ray's settings (RAY_AUTH_MODE=token with RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token)."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise click.UsageError("no cluster address: pass --address http://HEAD:8265 or set RAY_API_SERVER_ADDRESS")
    try:
        return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise SubmitError(
            f"the cluster at {address} refused the request: {e}. A cluster with token authentication needs "
            "RAY_AUTH_MODE=token here too, with its token in RAY_AUTH_TOKEN, in a file named by RAY_AUTH_TOKEN_PATH "
            "or in ~/.ray/auth_token (README.md, 'Clusters, sweeps and schedules')"
        ) from None
    except (ConnectionError, RuntimeError, ValueError) as e:
        raise SubmitError(f"cannot reach the Ray dashboard at {address}: {e}") from None


def follow(jobs_client, job_id: str, echo: Callable[[str], None]):
    """Print the job's logs as they come until it ends; returns its JobDetails."""

    async def tail() -> None:
        async for lines in jobs_client.tail_job_logs(job_id):
            echo(lines.rstrip("\n"))

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - the log stream is best effort; the status below is what counts
        echo(f"(log stream ended: {e}; waiting for the job to finish)")
    while not jobs_client.get_job_status(job_id).is_terminal():
        time.sleep(POLL_SECONDS)
    return jobs_client.get_job_info(job_id)


def exit_code(info) -> int:
    """The job's outcome as a process exit code (see the module docstring)."""
    from ray.job_submission import JobStatus

    if info.status == JobStatus.SUCCEEDED:
        return 0
    code = getattr(info, "driver_exit_code", None)
    if info.status == JobStatus.FAILED and code:
        return code
    return EXIT_JOB_FAILED


def _fail(e: Exception) -> None:
    click.echo(f"error: {e}", err=True)
    sys.exit(EXIT_JOB_FAILED)


address_option = click.option(
    "--address", default=None, metavar="URL",
    help="Ray dashboard of the cluster, e.g. http://HEAD:8265 (default: $RAY_API_SERVER_ADDRESS, then $RAY_ADDRESS).",
)


@click.command("submit", context_settings={"ignore_unknown_options": True})
@address_option
@click.option("--working-dir", default=None, type=click.Path(file_okay=False),
              help="Local folder uploaded as the job's working directory (relative paths in the command resolve "
                   "there); .venv, out/, .git and caches are left out.")
@click.option("--pip", "pip", multiple=True, metavar="REQ", help="Extra pip requirement for the job (repeatable).")
@click.option("--env", "env", multiple=True, metavar="NAME=VALUE",
              help="Environment variable for the job (repeatable). Not for credentials: job settings are visible "
                   "to anyone who can list jobs; give the cluster its credentials (infra/README.md).")
@click.option("--gpus", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="GPUs reserved for the command's driver process (bench model runs its model there); generate "
                   "and sweep stages request their own GPUs through --device cuda and --stage-config.")
@click.option("--cpus", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="CPUs reserved for the driver process.")
@click.option("--submission-id", default=None, help="Job id; the cluster refuses a second job with the same id.")
@click.option("--no-upload", is_flag=True,
              help="Do not upload this project's code: the cluster's image already has karlo-pipeline installed.")
@click.option("--no-wait", is_flag=True, help="Print the job id and return without waiting for the job.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, required=True)
@click.pass_context
def submit_cmd(ctx, address, working_dir, pip, env, gpus, cpus, submission_id, no_upload, no_wait, command) -> None:
    """Run a karlo COMMAND (e.g. `-- generate INPUT OUTPUT ...`) as a Ray job on the cluster and follow it.

    Paths in COMMAND are read on the cluster: use object-storage URLs, or files inside --working-dir. The exit
    code is the job's (0 succeeded; the command's own code, e.g. 2 or 3, when it failed; 1 otherwise).
    """
    root = ctx.find_root().command
    name = command[0]
    if name not in root.commands or name in NOT_JOBS:
        runnable = sorted(set(root.commands) - set(NOT_JOBS))
        raise click.UsageError(f"{name!r} is not a karlo command that can run as a job; one of: {', '.join(runnable)}")
    env_vars = {}
    for item in env:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.UsageError(f"--env expects NAME=VALUE, got {item!r}")
        env_vars[key] = value
    if gpus and name in PIPELINE_COMMANDS:
        click.echo(f"note: --gpus reserves GPUs for the {name} driver, which does no GPU work; its stages ask for "
                   "GPUs through --device cuda and --stage-config", err=True)
    relative = relative_paths(command)
    if relative and not working_dir:
        raise click.UsageError(
            f"{', '.join(relative[:3])}: relative to this folder, which the job on the cluster does not have; pass "
            "--working-dir . to upload this folder with the job (relative paths then resolve inside it), or use "
            "object-storage URLs"
        )
    renv = runtime_env(upload_code=not no_upload, working_dir=working_dir, pip=pip, env_vars=env_vars)
    try:
        jobs_client = client(address)
        job_id = jobs_client.submit_job(entrypoint=entrypoint(command), runtime_env=renv,
                                        submission_id=submission_id, entrypoint_num_cpus=cpus,
                                        entrypoint_num_gpus=gpus, metadata={"karlo_command": name})
    except SubmitError as e:
        _fail(e)
    except (RuntimeError, ValueError) as e:  # the server refused the job, e.g. a submission id already in use
        _fail(SubmitError(f"the cluster refused the job: {e}"))
    click.echo(f"submitted job {job_id}", err=True)
    if no_wait:
        click.echo(job_id)
        return
    try:
        info = follow(jobs_client, job_id, click.echo)
    except KeyboardInterrupt:
        click.echo(f"\nstopped following; the job keeps running. `karlo jobs stop {job_id}` stops it.", err=True)
        sys.exit(130)
    code = exit_code(info)
    click.echo(f"job {job_id} {info.status.value}" + (f" (exit code {code})" if code else ""), err=True)
    sys.exit(code)


@click.group("jobs")
def jobs_group() -> None:
    """Status, logs and stopping of jobs started with `karlo submit`."""


@jobs_group.command("status")
@address_option
@click.argument("job_id")
def status_cmd(address, job_id) -> None:
    """Print the job's status; the exit code is the job's outcome once it has ended (see `karlo submit`)."""
    try:
        info = client(address).get_job_info(job_id)
    except SubmitError as e:
        _fail(e)
    except RuntimeError as e:
        _fail(SubmitError(f"no job {job_id}: {e}"))
    click.echo(f"job {job_id}: {info.status.value}")
    if info.message:
        click.echo(info.message.strip().splitlines()[0])
    if info.status.is_terminal():
        sys.exit(exit_code(info))


@jobs_group.command("logs")
@address_option
@click.option("-f", "--follow", "follow_logs", is_flag=True, help="Keep printing until the job ends.")
@click.argument("job_id")
def logs_cmd(address, follow_logs, job_id) -> None:
    """Print the job's logs."""
    try:
        jobs_client = client(address)
        if follow_logs:
            sys.exit(exit_code(follow(jobs_client, job_id, click.echo)))
        click.echo(jobs_client.get_job_logs(job_id), nl=False)
    except SubmitError as e:
        _fail(e)
    except RuntimeError as e:
        _fail(SubmitError(f"no logs for job {job_id}: {e}"))


@jobs_group.command("stop")
@address_option
@click.option("--no-wait", is_flag=True, help="Return once the stop is requested.")
@click.argument("job_id")
def stop_cmd(address, no_wait, job_id) -> None:
    """Stop a running job."""
    try:
        jobs_client = client(address)
        if not jobs_client.stop_job(job_id):
            click.echo(f"job {job_id} had already ended: {jobs_client.get_job_status(job_id).value}")
            return
        click.echo(f"stop requested for job {job_id}")
        if not no_wait:
            while not (status := jobs_client.get_job_status(job_id)).is_terminal():
                time.sleep(POLL_SECONDS)
            click.echo(f"job {job_id}: {status.value}")
    except SubmitError as e:
        _fail(e)
    except RuntimeError as e:
        _fail(SubmitError(f"cannot stop job {job_id}: {e}"))
