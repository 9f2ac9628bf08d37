"""Write the JSON schema of each custom resource this package uses, from its CRD file.

    python docker/k8s/schemas/extract.py SOURCE CRD.yaml [CRD.yaml ...]

For each CRD: the ``openAPIV3Schema`` of its storage version, with ``description`` texts
removed (they do not constrain anything), and made strict the way ``kubectl --validate=strict``
is: an object that lists its ``properties`` and allows no others (no
``additionalProperties``, no ``x-kubernetes-preserve-unknown-fields``) refuses unknown fields,
so a misspelt field fails the test instead of being dropped by the API server. ``SOURCE``
(repository and tag the CRD came from) is recorded in the output. Embedded pod templates
(LeaderWorkerSet's ``leaderTemplate`` and ``workerTemplate``) are left open here: the tests
validate them against Kubernetes' own PodTemplateSpec schema instead (kubernetes-validate).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import yaml

OPEN_TEMPLATES = {"leaderTemplate", "workerTemplate"}


def strict(node: Any, name: str = "") -> Any:
    if isinstance(node, list):
        return [strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    if name in OPEN_TEMPLATES:
        return {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    out: dict[str, Any] = {}
    for k, v in node.items():
        if k == "description":
            continue
        if k == "properties":
            out[k] = {p: strict(s, p) for p, s in v.items()}
        else:
            out[k] = strict(v)
    if (
        out.get("type") == "object"
        and "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def main(source: str, paths: list[str]) -> None:
    here = Path(__file__).parent
    for path in paths:
        crd = yaml.safe_load(Path(path).read_text())
        spec = crd["spec"]
        version = next(v for v in spec["versions"] if v.get("storage"))
        schema = strict(version["schema"]["openAPIV3Schema"])
        name = f"{spec['group']}_{spec['names']['kind']}_{version['name']}.json".lower()
        schema["x-source"] = f"{source}: {Path(path).name} (descriptions removed, strict)"
        (here / name).write_text(json.dumps(schema, indent=1, sort_keys=True) + "\n")
        print(name)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
