"""The command line: `python -m ctxd_jax.train --config=configs/rl.py [--config.FIELD=VALUE ...] [--dry_run]`.

Parses, validates, and either prints the resolved config and the plan of processes (--dry_run) or runs the loop.
Bad input of any kind (unknown key, bad value, inconsistent settings, a missing model folder, a run folder in use)
ends with one line `error: field: message` and exit status 2, never a traceback, before any process starts.

Signals are handled here: the first SIGINT, SIGTERM or SIGHUP (Ctrl-C, preemption, `docker stop`, a scheduler's time
limit) asks the loop to stop with a checkpoint; the run then exits with 128 + the signal's number and one line
saying how to resume. A second one aborts. A server that dies or hangs ends the run with exit status 1 and an error
naming it with its log tail (--debug adds the traceback).

Several processes (one per host, CTXD_* or SLURM variables, ctxd_jax/hosts.py): every process runs this command;
process 0 alone handles the signals (the others ignore them: Ctrl-C reaches every process of a terminal or an srun
step) and stops the run for all after the step it is in, and one that fails ends every process at once (the others
within distributed.HEARTBEAT_TIMEOUT_S, through JAX's coordination service).
"""

import contextlib
import dataclasses
import logging
import os
import re
import shlex
import signal
import sys
import threading
import traceback
from typing import NoReturn

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from ctxd_jax import config as config_lib
from ctxd_jax import hosts
from ctxd_jax.plan import Gpus, Plan, gpu_memory_mib, machine_gpu_count, visible_devices

DEFAULT_CONFIG = "configs/rl.py"
# No default here: config_flags would load it and apply --config.* overrides while this module is imported, where a
# bad override could only end in a traceback. _parse_flags supplies the default instead.
_CONFIG = config_flags.DEFINE_config_file("config", None, f"Config file with get_config() (default {DEFAULT_CONFIG}).",
                                          lock_config=True)
_INFERENCE_GPU_IDS = flags.DEFINE_string("inference_gpu_ids", "", "GPU ids of the student vLLM server(s), e.g. 0,1.")
_TEACHER_GPU_IDS = flags.DEFINE_string("teacher_gpu_ids", "", "GPU ids of the teacher vLLM server; may overlap.")
_TRAINER_GPU_IDS = flags.DEFINE_string("trainer_gpu_ids", "", "GPU ids of the JAX trainer. No GPU ids = CPU mode.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the resolved config and the plan, start nothing.")
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of a run that fails (a dead server, the parity gate).")

EXIT_FAILED = 1
EXIT_CONFIG_ERROR = 2
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


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


def _load_outside_env(argv: list[str]) -> None:
    """An environment from outside the package (`--config.env.name=pkg.module:Class`) is imported before the config
    file is read, so config.env holds its keyword arguments (config.env.args) for --config.env.args.* to set."""
    from ctxd_jax import envs

    for arg in argv:
        match = re.match(r"^--?config\.env\.name=(.+:.+)$", arg)
        if match:
            try:
                envs.default_args(match.group(1))
            except ValueError as e:
                _fail(str(e))


def _parse_flags(argv: list[str]) -> list[str]:
    _load_outside_env(argv)
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


@contextlib.contextmanager
def stop_requests(ignore: bool = False):
    """Yields an Event that the first SIGINT/SIGTERM/SIGHUP sets (the loop checkpoints and stops); a second signal
    raises KeyboardInterrupt (abort; the servers still stop). `event.signum` is the first signal's number.
    `ignore`: the signals are ignored (a process > 0 of several: Ctrl-C reaches every process of a terminal or an
    srun step, and process 0 stops the run for all)."""
    event = threading.Event()
    event.signum = None

    def handler(signum, frame):
        if event.is_set():
            raise KeyboardInterrupt
        event.signum = signum
        event.set()
        print(f"\n{signal.Signals(signum).name}: stopping with a checkpoint; send it again to abort", file=sys.stderr)

    previous = {sig: signal.signal(sig, signal.SIG_IGN if ignore else handler) for sig in STOP_SIGNALS}
    try:
        yield event
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _hide_gpus(plan: Plan) -> None:
    """CPU mode: no process of the run sees a GPU (the servers inherit this; JAX is told before it is imported)."""
    if plan.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["JAX_PLATFORMS"] = "cpu"


def _resume_command(argv: list[str]) -> str:
    from ctxd_jax.rundir import RESUME_FLAG

    # A key given here is left out (never printed): a resumed run works with a new random one.
    dropped = r"^--?(no)?config\.(ckpt\.(resume|overwrite)|inference\.api_key)\b"
    kept = [a for a in argv[1:] if not re.match(dropped, a)]
    return shlex.join([os.path.basename(sys.executable), "-m", "ctxd_jax.train", *kept, RESUME_FLAG])


def _replot(path: str) -> None:
    from ctxd_jax import metrics, rundir

    metrics.plot(path, baseline=metrics.read_json(os.path.join(path, rundir.EVAL_BASELINE)))


def _run(config: ml_collections.ConfigDict, plan: Plan, argv: list[str], processes: hosts.Settings) -> int:
    """The run itself, after every check: exit status 0 (done), 1 (failed) or 128 + signal (stopped, resumable).
    With several processes only process 0 handles the stop signals; the others ignore them and stop when it says."""
    from ctxd_jax import distributed, loop, rundir  # JAX and vLLM load only for a real run
    from ctxd_jax.checkpoint import CheckpointError
    from ctxd_jax.finite import NonFiniteError
    from ctxd_jax.inference.client import RequestError
    from ctxd_jax.inference.server import ServerError
    from ctxd_jax.parity import ParityError
    from ctxd_jax.rewards import RewardError

    # absl logs at INFO: keep the per-request HTTP lines and orbax's bookkeeping out of the console.
    for name in ("httpx", "absl", "orbax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    status, several = 0, processes.several
    with stop_requests(ignore=not processes.leader) as stop:
        try:
            loop.run(config, plan, stop)  # every process of several too, each on its share
        except (ServerError, RequestError, CheckpointError, ParityError, RewardError, NonFiniteError) as e:
            if _DEBUG.value and not several:
                raise
            if _DEBUG.value:
                traceback.print_exc()
            print(f"error: {e}", file=sys.stderr)
            status = EXIT_FAILED
        except KeyboardInterrupt:
            print("aborted: no checkpoint of the step in progress", file=sys.stderr)
            status = 128 + (stop.signum or signal.SIGINT)
        except config_lib.ConfigError as e:  # found once the processes meet (a run folder not every host sees)
            _fail(str(e))
        except Exception:
            if not several:
                raise
            traceback.print_exc()
            status = EXIT_FAILED
    if status and several:  # the others may wait in a collective for this one
        distributed.exit_now(status)
    if status > EXIT_FAILED:
        return status
    if not stop.is_set():
        return status
    step = rundir.latest_step(rundir.run_path(config))
    if step is not None and step >= config.max_steps:
        return status
    saved = "no checkpoint yet" if step is None else f"checkpoint at step {step}"
    print(f"stopped by {signal.Signals(stop.signum).name} ({saved}); resume with: {_resume_command(argv)}",
          file=sys.stderr)
    return 128 + stop.signum


def main(argv: list[str]) -> int:
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]} (flags are --name=value)")
    try:
        gpus = Gpus(
            inference=config_lib.parse_gpu_ids("inference_gpu_ids", _INFERENCE_GPU_IDS.value),
            teacher=config_lib.parse_gpu_ids("teacher_gpu_ids", _TEACHER_GPU_IDS.value),
            trainer=config_lib.parse_gpu_ids("trainer_gpu_ids", _TRAINER_GPU_IDS.value),
            visible=visible_devices(os.environ.get("CUDA_VISIBLE_DEVICES")),
            machine=None if _DRY_RUN.value else machine_gpu_count(),  # a dry run may plan for another machine
        )
        processes = hosts.settings_from_env(os.environ)
        gpus = dataclasses.replace(gpus, memory_mib=gpu_memory_mib(gpus.run_devices()),
                                   processes=processes.num_processes)
        config, plan, warnings = config_lib.resolve(_CONFIG.value, gpus)
        hosts.check(config, plan, processes)
    except config_lib.ConfigError as e:
        _fail(str(e))
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if _DRY_RUN.value:
        print(config_lib.redacted(config))
        from ctxd_jax import envs

        print(envs.describe(envs.env_from_config(config), config.teacher.context))
        print(hosts.describe(config, plan, processes))  # last: what starts where
        return 0
    _hide_gpus(plan)
    if processes.several:  # first: reading the run folder's checkpoints below starts JAX's backend
        from ctxd_jax import distributed

        distributed.initialize(processes)
    from ctxd_jax import preflight, rundir
    from ctxd_jax.checkpoint import CheckpointError

    try:
        run = rundir.prepare(config)  # first: the quickest refusal
        preflight.check(config, plan)
    except config_lib.ConfigError as e:
        _fail(str(e))
    except CheckpointError as e:  # a checkpoint in the run folder that cannot be read
        _fail(f"output_dir: {e}")
    if run.overwrite and processes.leader:  # every process decides alike; one deletes
        if deleted := run.clear():
            print(f"ckpt.overwrite: deleted {', '.join(deleted)} in {run.path}", file=sys.stderr)
    if run.set_aside and processes.leader:
        print(f"ckpt.resume_step: later checkpoints set aside as {', '.join(run.put_aside())}", file=sys.stderr)
    if run.complete:
        if processes.leader:
            _replot(run.path)
        print(f"{run.path}: the run is complete (checkpoint at step {run.resume_step}, max_steps "
              f"{config.max_steps}); plots redrawn. Raise --config.max_steps to train on.", file=sys.stderr)
        return 0
    return _run(config, plan, sys.argv, processes)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
