"""Environments: seeded prompt datasets with verifiers and teacher contexts (see base.py)."""

from ctxd_jax.envs.base import (Environment, Example, check_context, default_args, describe, env_from_config,
                                env_names, get_env, parse_context, register, render_context, section,
                                settings)

__all__ = ["Environment", "Example", "check_context", "default_args", "describe", "env_from_config", "env_names",
           "get_env", "parse_context", "register", "render_context", "section", "settings"]
