"""The command line: `python -m ctxd_jax.train --config=configs/rl.py [--config.FIELD=VALUE ...] [--dry_run]`.

Parses, validates, and either prints the resolved config and the plan of processes (--dry_run) or runs the loop.
Bad input of any kind (unknown key, bad value, inconsistent settings) ends with one line `error: field: message`
and exit status 2, never a traceback.
"""

import logging
import os
import re
import sys
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ctxd_jax import config as config_lib
from ctxd_jax import envs, hosts

DEFAULT_CONFIG = "configs/rl.py"
# No default here: config_flags would load it and apply --config.* overrides while this module is imported, where a
# bad override could only end in a traceback. _parse_flags supplies the default instead.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Config file with get_config() (default {DEFAULT_CONFIG}).",
                                          lock_config=True)
_INFERENCE_GPU_IDS = flags.DEFINE_string("inference_gpu_ids", "", "GPU ids of the student vLLM server(s), e.g. 0,1.")
_TEACHER_GPU_IDS = flags.DEFINE_string("teacher_gpu_ids", "", "GPU ids of the teacher vLLM server; may overlap.")
_TRAINER_GPU_IDS = flags.DEFINE_string("trainer_gpu_ids", "", "GPU ids of the JAX trainer. No GPU ids = CPU mode.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config and the plan, start nothing.")

EXIT_CONFIG_ERROR = 2


def _fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_CONFIG_ERROR)


def _config_path(argv: list[str]) -> str:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return DEFAULT_CONFIG


def _override_error(error: BaseException, argv: list[str]) -> str:
    """An unknown key surfaces as a KeyError/AttributeError wrapping 'key' (+ a did-you-mean); name its override."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    text = str(error.args[0]) if error.args else str(error)
    key = re.search(r"'(\w+)'", text)
    hint = re.search(r"Did you mean \W*(\w+)", text)
    for arg in argv:
        match = re.match(r"^--?(?:no)?config\.([\w.]+)", arg)
        if key and match and key.group(1) in match.group(1).split("."):
            message = f"config.{match.group(1)}: unknown key {key.group(1)!r}"
            return message + (f" (did you mean {hint.group(1)!r}?)" if hint else " (run --dry_run to see the fields)")
    return "config: " + " ".join(text.split())


def _parse_flags(argv: list[str]) -> list[str]:
    if not any(re.match(r"^--?config(=|$)", arg) for arg in argv):
        argv = [argv[0], f"--config={DEFAULT_CONFIG}", *argv[1:]]
        sys.argv = argv  # config_flags reads the --config.* overrides from sys.argv
    try:
        remaining = flags.FLAGS(argv)
        if not isinstance(_CONFIG.value, ml_collections.ConfigDict):  # config_flags defers a load error to first use
            _CONFIG.value.model
    except OSError as e:
        last = str(e.__cause__ or e).strip().splitlines()[-1].strip()
        _fail(f"config: cannot load {_config_path(argv)!r}: {last}")
    except (KeyError, AttributeError) as e:
        _fail(_override_error(e, argv))
    except flags.Error as e:  # absl itself would print the usage and exit 1
        _fail(" ".join(str(e).split()))
    return remaining


def _check_env(config: ml_collections.ConfigDict) -> None:
    """Build the environment once (cheap: examples are lazy) so a bad env.name or env.args fails before any start."""
    try:
        envs.get_env(config.env.name, **config.env.args.to_dict())
    except TypeError as e:
        raise config_lib.ConfigError(f"env.args: {e}") from e
    except ValueError as e:
        message = str(e)
        raise config_lib.ConfigError(message if message.startswith("env.") else f"env: {message}") from e


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
        gpus = config_lib.Gpus(
            inference=config_lib.parse_gpu_ids("inference_gpu_ids", _INFERENCE_GPU_IDS.value),
            teacher=config_lib.parse_gpu_ids("teacher_gpu_ids", _TEACHER_GPU_IDS.value),
            trainer=config_lib.parse_gpu_ids("trainer_gpu_ids", _TRAINER_GPU_IDS.value),
        )
        config, plan, warnings = config_lib.resolve(_CONFIG.value, gpus)
        _check_env(config)
        processes = hosts.settings_from_env(os.environ)
        hosts.check(config, processes)
    except config_lib.ConfigError as e:
        _fail(str(e))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if _DRY_RUN.value:
        print(config)
        print(hosts.describe(config, plan, processes))
        return 0
    from ctxd_jax import multihost  # JAX and vLLM load only for a real run

    # absl logs at INFO: keep the per-request HTTP lines and orbax's bookkeeping out of the console.
    for name in ("httpx", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        multihost.run(config, plan, processes)  # one process: loop.run
    except config_lib.ConfigError as e:  # found once the processes meet (a run folder not every host sees)
        _fail(str(e))
    return 0


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
