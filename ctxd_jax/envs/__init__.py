"""Environments: seeded prompt datasets with verifiers and teacher contexts (see base.py)."""

from ctxd_jax.envs.base import (Environment, Example, default_args, env_from_config, env_names, get_env, parse_context,
                                register)

__all__ = ["Environment", "Example", "default_args", "env_from_config", "env_names", "get_env", "parse_context",
           "register"]
