"""Kubernetes manifests for KubeRay, rendered from one values file (``karlo render-k8s``), and the launcher that a
scheduled CronJob runs to create one RayJob per tick (``karlo launch-rayjob``).

Every manifest is built here from the same pieces: one pod template for the head and one per GPU worker group, one
RayClusterSpec, shared by the standing RayCluster, the RayJobs (generate, sweep), the RayJob that the CronJob
creates each tick and the RayCronJob alternative. Credentials are never written into a manifest: pods read them
from a Secret (``envFrom``) or get them from workload identity through a ServiceAccount.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import ssl
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from pipeline.config import GPU_SHARES, ConfigError, parse_stage_configs

CONFIG_MOUNT = "/etc/karlo"  # the ConfigMap with stages.yaml and sweep.yaml, in the head pod
TICK = "{tick}"  # in the scheduled RayJob's template: replaced by the tick's name when the launcher creates it
# Environment variable names that look like credentials: these belong in a Secret, never in a manifest.
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|ACCESS_KEY|PRIVATE", re.IGNORECASE)
_DNS_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PINNED = re.compile(r".+(@sha256:[0-9a-f]{64}|:[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})$")


@dataclass(frozen=True)
class WorkerGroup:
    name: str
    gpus: int  # per pod
    cpu: str
    memory: str
    min_replicas: int
    max_replicas: int
    gpu_type: str | None = None  # the node label nvidia.com/gpu.product, e.g. NVIDIA-A100-SXM4-80GB

    @property
    def replicas(self) -> int:
        return self.min_replicas


@dataclass(frozen=True)
class Values:
    """Everything a deployment varies; see infra/values.yaml for a commented example."""

    name: str
    namespace: str
    image: str
    ray_version: str
    workers: tuple[WorkerGroup, ...]
    head_cpu: str = "2"
    head_memory: str = "8Gi"
    secret: str | None = None  # a Secret whose keys become environment variables (e.g. AWS_ACCESS_KEY_ID)
    service_account: str | None = None  # workload identity: the pods run as this ServiceAccount
    env: dict[str, str] = field(default_factory=dict)  # non-secret settings, e.g. AWS_ENDPOINT_URL
    generate_args: tuple[str, ...] = ()  # `karlo generate` arguments for the generate RayJob
    sweep_spec: dict[str, Any] = field(default_factory=dict)  # the sweep run by the sweep RayJob and the schedule
    schedule: str = "0 3 * * *"
    time_zone: str = "Etc/UTC"
    stages: dict[str, Any] | None = None  # stage config for the jobs; default: the pools spread over every GPU
    ttl_seconds_after_finished: int = 3600
    active_deadline_seconds: int = 86400

    def __post_init__(self) -> None:
        _check(bool(_DNS_NAME.fullmatch(self.name)) and len(self.name) <= 40,
               f"name must be a lowercase DNS label of at most 40 characters, got {self.name!r}")
        _check(bool(_DNS_NAME.fullmatch(self.namespace)), f"namespace must be a DNS label, got {self.namespace!r}")
        _check(pinned(self.image), f"image must be pinned by a tag other than latest or by digest, got {self.image!r}")
        _check(bool(self.workers), "at least one GPU worker group is needed")
        _check(not (self.secret and self.service_account), "give secret or service_account, not both")
        for w in self.workers:
            _check(bool(_DNS_NAME.fullmatch(w.name)), f"worker group name must be a DNS label, got {w.name!r}")
            _check(w.gpus >= 1, f"worker group {w.name}: gpus must be >= 1")
            # Ray Data checks the cluster's GPUs before a run starts, so a group must keep at least one pod.
            _check(1 <= w.min_replicas <= w.max_replicas,
                   f"worker group {w.name}: need 1 <= min_replicas <= max_replicas")
        for key in self.env:
            _check(not SECRET_NAME.search(key), f"env {key} looks like a credential: put it in the Secret instead")
        parse_stage_configs(self.stage_config(), "cuda", "bfloat16")

    @property
    def total_gpus(self) -> int:
        return sum(w.gpus * w.max_replicas for w in self.workers)

    def stage_config(self) -> dict[str, Any]:
        """The given stage config, or each pool autoscaling up to one actor per GPU with the default GPU shares,
        which together fill every GPU of the largest cluster."""
        if self.stages is not None:
            return self.stages
        return {"defaults": {"device": "cuda", "dtype": "bfloat16"},
                **{name: {"actors": [1, self.total_gpus], "num_gpus": share} for name, share in GPU_SHARES.items()}}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"k8s values: {message}")


def pinned(image: str) -> bool:
    """An image reference with a fixed tag (not ``latest``) or a digest."""
    return bool(_PINNED.fullmatch(image)) and not image.endswith(":latest")


def load_values(path: str) -> Values:
    data = yaml.safe_load(Path(path).read_text())
    _check(isinstance(data, dict), "the values file must be a mapping")
    data = dict(data)
    workers = data.pop("workers", None)
    _check(isinstance(workers, list) and workers, "workers must be a list of GPU worker groups")
    base = Path(path).resolve().parent
    spec_path = data.pop("sweep_spec_file", None)
    if spec_path:
        data["sweep_spec"] = yaml.safe_load((base / spec_path).read_text())
    data["generate_args"] = tuple(data.get("generate_args", ()))
    try:
        return Values(workers=tuple(WorkerGroup(**w) for w in workers), **data)
    except TypeError as e:
        raise ConfigError(f"k8s values: {e}") from None


# --- pieces ---------------------------------------------------------------------------------------------------


def _labels(v: Values, component: str) -> dict[str, str]:
    return {"app.kubernetes.io/name": "karlo-pipeline", "app.kubernetes.io/instance": v.name,
            "app.kubernetes.io/component": component}


def _meta(v: Values, name: str, component: str) -> dict[str, Any]:
    return {"name": name, "namespace": v.namespace, "labels": _labels(v, component)}


def _env(v: Values) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if v.env:
        out["env"] = [{"name": k, "value": str(val)} for k, val in sorted(v.env.items())]
    if v.secret:
        out["envFrom"] = [{"secretRef": {"name": v.secret}}]
    return out


def _resources(cpu: str, memory: str, gpus: int = 0) -> dict[str, Any]:
    # Requests equal limits: the pod gets the Guaranteed QoS class, and KubeRay derives Ray's CPU, memory and GPU
    # counts from the limits.
    amounts = {"cpu": str(cpu), "memory": str(memory)}
    if gpus:
        amounts["nvidia.com/gpu"] = str(gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _pod(v: Values, container: str, resources: dict, *, head: bool, gpu_type: str | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {"name": container, "image": v.image, "imagePullPolicy": "IfNotPresent",
                         "resources": resources, **_env(v)}
    spec: dict[str, Any] = {"containers": [c]}
    if head:
        c["ports"] = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": 8265, "name": "dashboard"},
                      {"containerPort": 10001, "name": "client"}]
        c["volumeMounts"] = [{"name": "karlo-config", "mountPath": CONFIG_MOUNT, "readOnly": True}]
        spec["volumes"] = [{"name": "karlo-config", "configMap": {"name": f"{v.name}-config"}}]
    else:
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
        if gpu_type:
            spec["nodeSelector"] = {"nvidia.com/gpu.product": gpu_type}
        # Ray's object store lives in /dev/shm, which a container otherwise gets at 64 MB.
        c["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        spec["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    if v.service_account:
        spec["serviceAccountName"] = v.service_account
    return {"metadata": {"labels": _labels(v, "ray-head" if head else "ray-worker")}, "spec": spec}


def ray_cluster_spec(v: Values) -> dict[str, Any]:
    workers = [{
        "groupName": w.name,
        "replicas": w.replicas,
        "minReplicas": w.min_replicas,
        "maxReplicas": w.max_replicas,
        "rayStartParams": {},
        "template": _pod(v, "ray-worker", _resources(w.cpu, w.memory, w.gpus), head=False, gpu_type=w.gpu_type),
    } for w in v.workers]
    return {
        "rayVersion": v.ray_version,
        "enableInTreeAutoscaling": any(w.max_replicas > w.min_replicas for w in v.workers),
        # Token authentication, as Ray enables it by default for clusters it starts itself; KubeRay creates the
        # token Secret and hands it to the head, the workers and the job submitter.
        "authOptions": {"mode": "token"},
        "headGroupSpec": {
            # No Ray tasks on the head: it runs the GCS, the dashboard and the job drivers.
            "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
            "template": _pod(v, "ray-head", _resources(v.head_cpu, v.head_memory), head=True),
        },
        "workerGroupSpecs": workers,
    }


def _rayjob_spec(v: Values, entrypoint: str, job_id: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "entrypoint": entrypoint,
        # The driver plans and writes; the stages' actors ask for their own GPUs.
        "entrypointNumCpus": 0,
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": v.ttl_seconds_after_finished,
        "activeDeadlineSeconds": v.active_deadline_seconds,
        "backoffLimit": 0,  # a retry creates a new cluster; rerunning the command resumes instead
        "rayClusterSpec": ray_cluster_spec(v),
    }
    if job_id:
        spec["jobId"] = job_id
    return spec


def _sweep_entrypoint(output: str | None = None) -> str:
    command = f"python -m jobs.cli sweep {CONFIG_MOUNT}/sweep.yaml"
    return command + (f" --output {output}" if output else "")


# --- manifests ------------------------------------------------------------------------------------------------


def config_map(v: Values) -> dict[str, Any]:
    data = {"stages.yaml": yaml.safe_dump(v.stage_config(), sort_keys=False)}
    if v.sweep_spec:
        spec = dict(v.sweep_spec)
        spec.pop("stages", None)
        spec["stage_config"] = f"{CONFIG_MOUNT}/stages.yaml"
        data["sweep.yaml"] = yaml.safe_dump(spec, sort_keys=False)
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(v, f"{v.name}-config", "config"),
            "data": data}


def ray_cluster(v: Values) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(v, v.name, "ray-cluster"),
            "spec": ray_cluster_spec(v)}


def generate_rayjob(v: Values) -> dict[str, Any]:
    args = shlex.join(v.generate_args)
    entrypoint = f"python -m jobs.cli generate {args} --device cuda --stage-config {CONFIG_MOUNT}/stages.yaml"
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, f"{v.name}-generate", "generate"),
            "spec": _rayjob_spec(v, entrypoint)}


def sweep_rayjob(v: Values) -> dict[str, Any]:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, f"{v.name}-sweep", "sweep"),
            "spec": _rayjob_spec(v, _sweep_entrypoint())}


def scheduled_rayjob_template(v: Values) -> dict[str, Any]:
    """The RayJob created at each tick: named after the tick, with the tick as its Ray submission id, writing
    the sweep into OUTPUT/<tick>/."""
    output = f"{v.sweep_spec['output'].rstrip('/')}/{TICK}"
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(v, TICK, "scheduled-sweep"),
            "spec": _rayjob_spec(v, _sweep_entrypoint(output), job_id=TICK)}


def schedule_objects(v: Values) -> list[dict[str, Any]]:
    """A CronJob whose pod creates the tick's RayJob and waits for it, with the RBAC that allows exactly that.

    The CronJob controller names each tick's Job ``<cronjob>-<minutes since epoch>``; the launcher names the
    RayJob after it, so a retried or duplicated tick finds its RayJob already there and only waits for it.
    ``concurrencyPolicy: Forbid`` with a pod that lives as long as its RayJob keeps ticks from overlapping.
    """
    launcher = f"{v.name}-sweep-launcher"
    template = f"{v.name}-sweep-rayjob"
    rules = [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get"]}]
    pod = {
        "serviceAccountName": launcher,
        "restartPolicy": "Never",
        "containers": [{
            "name": "launcher",
            "image": v.image,
            "imagePullPolicy": "IfNotPresent",
            "command": ["python", "-m", "jobs.cli", "launch-rayjob", f"{CONFIG_MOUNT}/rayjob.yaml",
                        "--name", "$(TICK)"],
            "env": [{"name": "TICK", "valueFrom": {"fieldRef": {
                "fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}}],
            "resources": _resources("100m", "256Mi"),
            "volumeMounts": [{"name": "template", "mountPath": CONFIG_MOUNT, "readOnly": True}],
        }],
        "volumes": [{"name": "template", "configMap": {"name": template}}],
    }
    cron = {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": _meta(v, f"{v.name}-sweep", "schedule"),
        "spec": {
            "schedule": v.schedule,
            "timeZone": v.time_zone,
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,  # a tick missed by more than an hour is skipped, not caught up
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {"spec": {"backoffLimit": 2, "template": {
                "metadata": {"labels": _labels(v, "schedule")}, "spec": pod}}},
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(v, launcher, "schedule")},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(v, launcher, "schedule"),
         "rules": rules},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": _meta(v, launcher, "schedule"),
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": launcher},
         "subjects": [{"kind": "ServiceAccount", "name": launcher, "namespace": v.namespace}]},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _meta(v, template, "schedule"),
         "data": {"rayjob.yaml": yaml.safe_dump(scheduled_rayjob_template(v), sort_keys=False)}},
        cron,
    ]


def ray_cron_job(v: Values) -> dict[str, Any]:
    """KubeRay's RayCronJob (alpha, behind the RayCronJob feature gate). Its RayJobs are named
    ``<name>-<minutes since epoch>`` per tick, but it has no concurrency policy, and its template cannot know the
    tick: every tick continues the same sweep root (finished points are skipped), so use it for sweeps whose
    points are quick to check, or prefer the CronJob."""
    return {"apiVersion": "ray.io/v1", "kind": "RayCronJob", "metadata": _meta(v, f"{v.name}-sweep", "schedule"),
            "spec": {"schedule": v.schedule, "timeZone": v.time_zone,
                     "jobTemplate": _rayjob_spec(v, _sweep_entrypoint())}}


def render(v: Values) -> dict[str, list[dict[str, Any]]]:
    """File name -> the manifests in it."""
    out = {
        "configmap.yaml": [config_map(v)],
        "raycluster.yaml": [ray_cluster(v)],
    }
    if v.generate_args:
        out["rayjob-generate.yaml"] = [generate_rayjob(v)]
    if v.sweep_spec:
        out["rayjob-sweep.yaml"] = [sweep_rayjob(v)]
        out["cronjob-sweep.yaml"] = schedule_objects(v)
        out["raycronjob-sweep.yaml"] = [ray_cron_job(v)]
    return out


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the files inside ConfigMaps) as literal blocks, so they read as the files they are."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s,
                                                             style="|" if "\n" in s else None))


def dump(docs: list[dict[str, Any]]) -> str:
    header = "# Rendered by `karlo render-k8s` from infra/values.yaml; edit the values, not this file.\n"
    return header + "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=120) for d in docs)


@click.command("render-k8s")
@click.option("--values", "values_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Values file (see infra/values.yaml).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the manifests.")
def render_k8s_cmd(values_path: str, out_dir: str) -> None:
    """Render the KubeRay RayCluster, the generate and sweep RayJobs and the schedule from one values file."""
    try:
        values = load_values(values_path)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in render(values).items():
        (out / name).write_text(dump(docs))
        click.echo(f"wrote {out / name}")


# --- the launcher: runs in the CronJob's pod ----------------------------------------------------------------------

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
EXIT_RAYJOB_FAILED = 1


@dataclass(frozen=True)
class KubeApi:
    """The Kubernetes API as seen from inside a pod: its URL, the pod's ServiceAccount token and CA."""

    url: str
    token: str
    namespace: str
    ca_file: str | None = None

    @classmethod
    def in_cluster(cls) -> KubeApi:
        host, port = os.environ["KUBERNETES_SERVICE_HOST"], os.environ["KUBERNETES_SERVICE_PORT"]
        return cls(url=f"https://{host}:{port}", token=(SERVICE_ACCOUNT_DIR / "token").read_text().strip(),
                   namespace=(SERVICE_ACCOUNT_DIR / "namespace").read_text().strip(),
                   ca_file=str(SERVICE_ACCOUNT_DIR / "ca.crt"))

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        req = urllib.request.Request(f"{self.url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {self.token}",
                                              "Content-Type": "application/json", "Accept": "application/json"})
        context = ssl.create_default_context(cafile=self.ca_file) if self.url.startswith("https") else None
        try:
            with urllib.request.urlopen(req, context=context, timeout=30) as r:
                return r.status, json.loads(r.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")


def launch_rayjob(api: KubeApi, template: dict[str, Any], tick: str, *, wait: bool = True,
                  poll_seconds: float = 30.0, echo=print) -> int:
    """Create the tick's RayJob from ``template`` (its ``{tick}`` placeholders replaced) unless it exists, then wait
    for it to finish; returns 0 when its job succeeded."""
    _check(bool(_DNS_NAME.fullmatch(tick)), f"tick name must be a DNS label, got {tick!r}")
    manifest = json.loads(json.dumps(template).replace(TICK, tick))
    manifest["metadata"]["namespace"] = api.namespace
    path = f"/apis/ray.io/v1/namespaces/{api.namespace}/rayjobs"
    status, body = api.request("POST", path, manifest)
    if status == 409:
        echo(f"RayJob {tick} already exists: this tick was already launched")
    elif status >= 300:
        echo(f"could not create RayJob {tick}: HTTP {status} {body.get('message', '')}")
        return EXIT_RAYJOB_FAILED
    else:
        echo(f"created RayJob {tick}")
    while wait:
        status, body = api.request("GET", f"{path}/{tick}")
        if status >= 300:
            echo(f"could not read RayJob {tick}: HTTP {status} {body.get('message', '')}")
            return EXIT_RAYJOB_FAILED
        state = body.get("status", {})
        if state.get("jobDeploymentStatus") in ("Complete", "Failed"):
            echo(f"RayJob {tick}: {state.get('jobDeploymentStatus')}, job {state.get('jobStatus')} "
                 f"{state.get('message', '')}".rstrip())
            return 0 if state.get("jobStatus") == "SUCCEEDED" else EXIT_RAYJOB_FAILED
        time.sleep(poll_seconds)
    return 0


@click.command("launch-rayjob")
@click.argument("template_path", type=click.Path(exists=True, dir_okay=False))
@click.option("--name", "tick", required=True, help="The tick's name (the CronJob's Job name).")
@click.option("--no-wait", is_flag=True, help="Return once the RayJob exists.")
def launch_rayjob_cmd(template_path: str, tick: str, no_wait: bool) -> None:
    """Create the RayJob for one scheduled tick (run by the CronJob from `karlo render-k8s`) and wait for it."""
    template = yaml.safe_load(Path(template_path).read_text())
    try:
        code = launch_rayjob(KubeApi.in_cluster(), template, tick, wait=not no_wait, echo=click.echo)
    except ConfigError as e:
        raise click.UsageError(str(e)) from None
    sys.exit(code)
