"""Test setup: 8 fake CPU devices (so sharding is really exercised), before jax is imported."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture
def repo():
    return REPO


def smoke_config(**overrides):
    """configs/sft.py:smoke with dotted-key overrides, e.g. {'train.num_steps': 4}."""
    from jaxpost import config as config_lib

    config = config_lib.load_config(str(REPO / "configs" / "sft.py") + ":smoke")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config
