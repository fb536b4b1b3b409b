"""Regenerate the vendored schemas in this folder (see SOURCES.md).

    python tests/data/schemas/vendor.py KUBERAY_CRD_DIR KUBERNETES_VALIDATE_WHEEL

KUBERAY_CRD_DIR holds ray-operator/config/crd/bases/ray.io_{rayclusters,rayjobs,raycronjobs}.yaml of a KubeRay
release; they are stored gzipped, unchanged. From the kubernetes-validate wheel, the schema of each Kubernetes kind
the manifests use is written as one standalone JSON Schema: the kind's schema plus only the definitions it
reaches, with references rewritten to point inside the file.
"""

from __future__ import annotations

import gzip
import json
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
KUBERAY_DIR = "kuberay-v1.7.0"
KUBERNETES_VERSION = "v1.33.0"
CRDS = ("ray.io_rayclusters.yaml", "ray.io_rayjobs.yaml", "ray.io_raycronjobs.yaml")
KINDS = ("cronjob-batch-v1", "configmap-v1", "serviceaccount-v1", "role-rbac-v1", "rolebinding-rbac-v1",
         "objectmeta-meta-v1")
# A kind's file refers to the shared definitions file; definitions refer to each other within it.
DEFS_REFS = ("/api/_definitions.json#/$defs/", "#/$defs/")


def standalone(schema: dict, definitions: dict) -> dict:
    """``schema`` with the definitions it reaches under ``$defs`` and every reference pointing there."""
    used: dict[str, dict] = {}

    def walk(node):
        if isinstance(node, dict):
            out = {}
            for key, value in node.items():
                prefix = next((p for p in DEFS_REFS if key == "$ref" and value.startswith(p)), None)
                if prefix:
                    name = value[len(prefix):]
                    out[key] = f"#/$defs/{name}"
                    if name not in used:
                        used[name] = {}  # marks it as visited: definitions are recursive (JSONSchemaProps)
                        used[name] = walk(definitions[name])
                elif key != "$id":
                    out[key] = walk(value)
            return out
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    root = walk(schema)
    root["$defs"] = dict(sorted(used.items()))
    return root


def main(crd_dir: str, wheel: str) -> None:
    out = HERE / KUBERAY_DIR
    out.mkdir(exist_ok=True)
    for name in CRDS:
        data = (Path(crd_dir) / name).read_bytes()
        (out / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
    prefix = f"kubernetes_validate/kubernetes-json-schema/{KUBERNETES_VERSION}-local-strict/"
    out = HERE / f"kubernetes-{KUBERNETES_VERSION}-local-strict"
    out.mkdir(exist_ok=True)
    with zipfile.ZipFile(wheel) as z:
        definitions = json.loads(z.read(prefix + "_definitions.json"))["$defs"]
        for kind in KINDS:
            schema = standalone(json.loads(z.read(f"{prefix}{kind}.json")), definitions)
            (out / f"{kind}.json").write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(*sys.argv[1:])
