"""infra/: the rendered manifests are up to date, validate against the vendored KubeRay CRD and Kubernetes schemas
(tests/data/schemas/SOURCES.md), and follow the deployment rules (pinned images, one Ray version everywhere,
GPU requests equal to limits, no credentials inline); the scheduled launcher creates one RayJob per tick."""

from __future__ import annotations

import functools
import gzip
import http.server
import json
import re
import threading
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml
from click.testing import CliRunner

from jobs import k8s
from jobs.cli import main
from jobs.sweep.spec import parse_spec, points
from pipeline.config import ConfigError, load_stage_config_file

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
SCHEMAS = Path(__file__).resolve().parent / "data" / "schemas"
CRDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
KINDS = {"CronJob": "cronjob-batch-v1", "ConfigMap": "configmap-v1", "ServiceAccount": "serviceaccount-v1",
         "Role": "role-rbac-v1", "RoleBinding": "rolebinding-rbac-v1"}
TICK = "karlo-sweep-29400000"  # a CronJob Job name: <cronjob>-<minutes since epoch>


def strict(schema):
    """A CRD schema that rejects unknown fields, as `kubectl apply` (strict field validation) does."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


@functools.cache
def crd_schema(kind: str) -> dict:
    crd = yaml.safe_load(gzip.decompress((SCHEMAS / "kuberay-v1.7.0" / f"{CRDS[kind]}.gz").read_bytes()))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    return strict(version["schema"]["openAPIV3Schema"])


@functools.cache
def k8s_schema(name: str) -> dict:
    return json.loads((SCHEMAS / "kubernetes-v1.33.0-local-strict" / f"{name}.json").read_text())


def validate(doc: dict) -> None:
    kind = doc["kind"]
    if kind in CRDS:
        jsonschema.Draft7Validator(crd_schema(kind)).validate(doc)
        # CRD schemas leave metadata open; the API server checks it as ObjectMeta.
        jsonschema.Draft202012Validator(k8s_schema("objectmeta-meta-v1")).validate(doc["metadata"])
    else:
        jsonschema.Draft202012Validator(k8s_schema(KINDS[kind])).validate(doc)


def rendered() -> dict[str, list[dict]]:
    return {p.name: list(yaml.safe_load_all(p.read_text())) for p in sorted((INFRA / "k8s").glob("*.yaml"))}


def all_docs() -> list[dict]:
    """Every manifest, plus the RayJob that the CronJob creates each tick (a string inside its ConfigMap)."""
    docs = [d for ds in rendered().values() for d in ds]
    for d in list(docs):
        if d["kind"] == "ConfigMap" and "rayjob.yaml" in d["data"]:
            docs.append(yaml.safe_load(d["data"]["rayjob.yaml"].replace("{tick}", TICK)))
    return docs


def containers(doc: dict) -> list[dict]:
    """Every container spec anywhere in a manifest."""
    found = []

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("containers", "initContainers") and isinstance(value, list):
                    found.extend(value)
                walk(value)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(doc)
    return found


def cluster_specs(doc: dict) -> list[dict]:
    spec = doc["spec"]
    return [s for s in (spec if doc["kind"] == "RayCluster" else None, spec.get("rayClusterSpec"),
                        spec.get("jobTemplate", {}).get("rayClusterSpec")) if s]


def dockerfile_ray_version() -> str:
    return re.search(r"^ARG RAY_VERSION=(\S+)$", (INFRA / "Dockerfile").read_text(), re.M).group(1)


def test_rendered_manifests_are_up_to_date(tmp_path):
    result = CliRunner().invoke(main, ["render-k8s", "--values", str(INFRA / "values.yaml"), "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    fresh = {p.name: p.read_text() for p in tmp_path.iterdir()}
    committed = {p.name: p.read_text() for p in (INFRA / "k8s").glob("*.yaml")}
    assert fresh == committed, "infra/k8s is stale: run `karlo render-k8s --values infra/values.yaml --out infra/k8s`"
    assert set(fresh) == {"configmap.yaml", "raycluster.yaml", "rayjob-generate.yaml", "rayjob-sweep.yaml",
                          "cronjob-sweep.yaml", "raycronjob-sweep.yaml"}


@pytest.mark.parametrize("doc", all_docs(), ids=lambda d: f"{d['kind']}-{d['metadata']['name']}")
def test_manifest_validates_against_its_schema(doc):
    validate(doc)


def test_schemas_reject_mistakes():
    """The validation is strict: a misspelt field or a wrong type fails, in the CRDs and in Kubernetes kinds."""
    job = next(d for d in all_docs() if d["kind"] == "RayJob")
    misspelt = json.loads(json.dumps(job))
    misspelt["spec"]["shutdownAfterJobFinish"] = True
    with pytest.raises(jsonschema.ValidationError, match="shutdownAfterJobFinish"):
        validate(misspelt)
    wrong_type = json.loads(json.dumps(job))
    wrong_type["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_type)
    cron = next(d for d in all_docs() if d["kind"] == "CronJob")
    misspelt_cron = json.loads(json.dumps(cron))
    misspelt_cron["spec"]["concurrency_policy"] = "Forbid"
    with pytest.raises(jsonschema.ValidationError, match="concurrency_policy"):
        validate(misspelt_cron)
    wrong_cron = json.loads(json.dumps(cron))
    wrong_cron["spec"]["startingDeadlineSeconds"] = "an hour"
    with pytest.raises(jsonschema.ValidationError):
        validate(wrong_cron)
    bad_meta = json.loads(json.dumps(job))
    bad_meta["metadata"]["label"] = {"a": "b"}
    with pytest.raises(jsonschema.ValidationError, match="label"):
        validate(bad_meta)


def test_one_ray_version_everywhere():
    versions = {s["rayVersion"] for d in all_docs() if d["kind"].startswith("Ray") for s in cluster_specs(d)}
    assert versions == {dockerfile_ray_version()} == {ray.__version__}


def test_images_are_pinned():
    base = re.search(r"^FROM (\S+)", (INFRA / "Dockerfile").read_text(), re.M).group(1)
    assert k8s.pinned(base), base
    images = {c["image"] for d in all_docs() for c in containers(d)}
    assert images and all(k8s.pinned(i) for i in images), images
    assert not k8s.pinned("ghcr.io/x/karlo:latest") and not k8s.pinned("ghcr.io/x/karlo")
    assert k8s.pinned("localhost:5000/karlo@sha256:" + "0" * 64)


def test_requests_equal_limits_and_gpus_only_on_workers():
    for doc in all_docs():
        for c in containers(doc):
            assert c["resources"]["requests"] == c["resources"]["limits"], (doc["metadata"]["name"], c["name"])
        for spec in (cluster_specs(doc) if doc["kind"].startswith("Ray") else []):
            head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
            assert "nvidia.com/gpu" not in head["resources"]["limits"]
            assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
            for group in spec["workerGroupSpecs"]:
                limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
                assert int(limits["nvidia.com/gpu"]) >= 1
                assert 1 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]


def test_no_inline_credentials():
    for doc in all_docs():
        for c in containers(doc):
            for env in c.get("env", []):
                assert "value" not in env or not k8s.SECRET_NAME.search(env["name"]), env
    for doc in all_docs():
        if doc["kind"].startswith("Ray"):
            for spec in cluster_specs(doc):
                for c in containers(spec):
                    assert c["envFrom"] == [{"secretRef": {"name": "karlo-s3"}}]
    assert all(d["kind"] != "Secret" for d in all_docs())


def test_rayjobs_clean_up_and_schedule_cannot_overlap():
    docs = all_docs()
    for job in [d for d in docs if d["kind"] == "RayJob"] + [d["spec"]["jobTemplate"] for d in docs
                                                             if d["kind"] == "RayCronJob"]:
        spec = job.get("spec", job)
        assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
        assert spec["entrypoint"].startswith("python -m jobs.cli ")
        assert spec["entrypointNumCpus"] == 0 and "entrypointNumGpus" not in spec
    cron = next(d for d in docs if d["kind"] == "CronJob")
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    scheduled = next(d for d in docs if d["metadata"]["name"] == TICK)
    assert scheduled["spec"]["jobId"] == TICK
    assert scheduled["spec"]["entrypoint"].endswith(f"--output s3://karlo-data/sweeps/guidance/{TICK}")


def test_config_map_holds_a_valid_sweep_and_stage_config():
    config = next(d for d in all_docs() if d["metadata"]["name"] == "karlo-config")
    stages = load_stage_config_file(config["data"]["stages.yaml"], "cuda", "bfloat16")
    assert all(s.device == "cuda" and s.max_actors == 4 for s in stages.values())
    spec = yaml.safe_load(config["data"]["sweep.yaml"])
    assert spec["stage_config"] == "/etc/karlo/stages.yaml"
    spec.pop("stage_config")  # a path on the cluster
    grid = points(parse_spec(spec))
    assert len(grid) == 8 and grid[0].name == "pg2_dg4_steps25-25-7_n4"


def test_values_errors(tmp_path):
    base = yaml.safe_load((INFRA / "values.yaml").read_text())
    base.pop("sweep_spec_file")
    cases = [
        ({"image": "ghcr.io/x/karlo:latest"}, "image must be pinned"),
        ({"env": {"AWS_SECRET_ACCESS_KEY": "x"}}, "looks like a credential"),
        ({"service_account": "sa"}, "give secret or service_account, not both"),
        ({"workers": [{**base["workers"][0], "min_replicas": 0}]}, "need 1 <= min_replicas"),
        ({"name": "Karlo_1"}, "name must be a lowercase DNS label"),
        ({"colour": "blue"}, "unexpected keyword argument 'colour'"),
    ]
    for change, message in cases:
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump({**base, **change}))
        with pytest.raises(ConfigError, match=re.escape(message)):
            k8s.load_values(str(path))
        result = CliRunner().invoke(main, ["render-k8s", "--values", str(path), "--out", str(tmp_path / "out")])
        assert result.exit_code == 2 and message in result.output


def test_workload_identity_instead_of_a_secret(tmp_path):
    values = yaml.safe_load((INFRA / "values.yaml").read_text())
    values.pop("secret")
    values["service_account"] = "karlo-workload"
    values["sweep_spec_file"] = str(INFRA / "sweep.yaml")
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    docs = k8s.render(k8s.load_values(str(path)))
    cluster = docs["raycluster.yaml"][0]
    validate(cluster)
    pods = [cluster["spec"]["headGroupSpec"]["template"]] + [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    assert all(p["spec"]["serviceAccountName"] == "karlo-workload" for p in pods)
    assert all("envFrom" not in c for c in containers(cluster))


class FakeKube(http.server.BaseHTTPRequestHandler):
    """The part of the Kubernetes API the launcher uses: create and get RayJobs."""

    rayjobs: dict[str, dict] = {}
    finish_as = "SUCCEEDED"

    def _reply(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server's naming
        assert self.headers["Authorization"] == "Bearer t0ken"
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        name = body["metadata"]["name"]
        if name in self.rayjobs:
            return self._reply(409, {"message": f'rayjobs.ray.io "{name}" already exists'})
        self.rayjobs[name] = body
        self._reply(201, body)

    def do_GET(self):  # noqa: N802
        name = self.path.rsplit("/", 1)[-1]
        if name not in self.rayjobs:
            return self._reply(404, {"message": "not found"})
        self._reply(200, {**self.rayjobs[name], "status": {"jobDeploymentStatus": "Complete",
                                                            "jobStatus": self.finish_as}})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_kube():
    FakeKube.rayjobs = {}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeKube)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield k8s.KubeApi(url=f"http://127.0.0.1:{server.server_port}", token="t0ken", namespace="karlo")
    server.shutdown()


def test_launcher_creates_one_rayjob_per_tick(fake_kube):
    template = yaml.safe_load(next(d for d in rendered()["cronjob-sweep.yaml"]
                                   if d["kind"] == "ConfigMap")["data"]["rayjob.yaml"])
    lines: list[str] = []
    assert k8s.launch_rayjob(fake_kube, template, TICK, poll_seconds=0, echo=lines.append) == 0
    created = FakeKube.rayjobs[TICK]
    assert created["spec"]["jobId"] == TICK and "{tick}" not in json.dumps(created)
    validate(created)
    # The same tick again (a retried pod, a duplicated schedule): nothing new is created, it waits for the first.
    assert k8s.launch_rayjob(fake_kube, template, TICK, poll_seconds=0, echo=lines.append) == 0
    assert list(FakeKube.rayjobs) == [TICK]
    assert lines[0] == f"created RayJob {TICK}"
    assert f"RayJob {TICK} already exists: this tick was already launched" in lines
    FakeKube.finish_as = "FAILED"
    try:
        assert k8s.launch_rayjob(fake_kube, template, "karlo-sweep-29400060", poll_seconds=0, echo=lines.append) == 1
    finally:
        FakeKube.finish_as = "SUCCEEDED"
    with pytest.raises(ConfigError, match="tick name must be a DNS label"):
        k8s.launch_rayjob(fake_kube, template, "Bad_Name", echo=lines.append)
