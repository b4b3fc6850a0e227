"""What an offline `launch/install.sh --gpu` installs (OFFLINE_WHEELS set; BUILD.md, "Offline").

Run by the new venv's python, which sees the base environment's packages (the CUDA stack) through a .pth file, from
the repository root. For every pinned package (pyproject.toml's gpu extra, launch/gpu-constraints.txt and the pins
given as arguments): one the base has is kept, at its
version even where that differs from the pin; one it lacks is installed from the wheel folders, at exactly the
pinned version (another version there is an error); one in neither is listed and left out. Prints the `name==version`
specs to install on stdout, one a line, and the summary on stderr.

    python launch/offline_plan.py DIR[:DIR...] [NAME==VERSION ...]
"""

import importlib.metadata
import os
import re
import sys
import sysconfig
import tomllib


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.lower())


def read_pins(lines) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[norm(name.split("[", 1)[0])] = version.strip()
    return pins


def wheels_in(dirs) -> dict[str, set[str]]:
    """Name -> versions of the wheels in `dirs` (a wheel's file name is name-version-...; '-' is escaped in both)."""
    found: dict[str, set[str]] = {}
    for d in dirs:
        for f in os.listdir(d):
            if f.endswith(".whl"):
                name, version = f.split("-")[:2]
                found.setdefault(norm(name), set()).add(version)
    return found


def base_packages() -> dict[str, str]:
    """Name -> version of the packages outside this venv: what the venv installed itself is planned again, so that
    a changed pin replaces it."""
    own = os.path.realpath(sysconfig.get_path("purelib"))
    return {norm(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()
            if d.metadata["Name"] and os.path.realpath(d.locate_file("")) != own}


def plan(pins: dict[str, str], have: dict[str, str], wheels: dict[str, set[str]]):
    """(specs to install, kept at another version {name: (have, pin)}, kept at the pin, missing, errors)."""
    install, other, same, missing, errors = [], {}, [], [], []
    for name, pin in sorted(pins.items()):
        if name in have and have[name] == pin:
            same.append(name)
        elif name in have:
            other[name] = (have[name], pin)
        elif pin in wheels.get(name, ()):
            install.append(f"{name}=={pin}")
        elif name in wheels:
            errors.append(f"{name}: the wheel folders have {', '.join(sorted(wheels[name]))}, the pin is {pin}")
        else:
            missing.append(name)
    return install, other, same, missing, errors


def main(argv: list[str]) -> int:
    dirs, extra = argv[0].split(":"), argv[1:]
    with open("pyproject.toml", "rb") as f:
        gpu_extra = tomllib.load(f)["project"]["optional-dependencies"]["gpu"]
    with open("launch/gpu-constraints.txt") as f:
        pins = read_pins(gpu_extra + list(f) + extra)
    install, other, same, missing, errors = plan(pins, base_packages(), wheels_in(dirs))
    if errors:
        print("install: offline: a wheel is not at its pin:\n  " + "\n  ".join(errors), file=sys.stderr)
        return 2
    kept = ", ".join(f"{n} {h} (pin {p})" for n, (h, p) in other.items()) or "none"
    print(f"install: offline, {len(pins)} pinned packages:\n"
          f"  {len(install)} to install from {':'.join(dirs)}\n"
          f"  {len(same)} already there at the pin\n"
          f"  {len(other)} already there at another version, kept: {kept}\n"
          f"  {len(missing)} in neither, left out: {', '.join(missing) or 'none'}", file=sys.stderr)
    print("\n".join(install))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
