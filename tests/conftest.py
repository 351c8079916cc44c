"""Test setup: 8 fake CPU devices (so sharding is really exercised), before jax is imported."""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the CLI subprocesses they start, which inherit this) compile the same smoke
# steps: XLA's persistent cache compiles each once per suite. A size limit turns on the cache's
# file lock, which pytest-xdist's parallel workers need.
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".cache", "xla"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))


def _repair_compilation_cache(path: str) -> None:
    """Drop entries a killed process left half-written (a `-cache` file without its `-atime`):
    jax's cache eviction fails on them, and with it every later write to the cache."""
    try:
        names = set(os.listdir(path))
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith("-cache") and name[: -len("-cache")] + "-atime" not in names:
            try:
                os.remove(os.path.join(path, name))
            except FileNotFoundError:
                pass


_repair_compilation_cache(os.environ["JAX_COMPILATION_CACHE_DIR"])

import pathlib  # noqa: E402
import socket  # noqa: E402

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


def free_port() -> int:
    """A free localhost port for a `jax.distributed` coordinator."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int) -> dict:
    """The environment of a subprocess with `devices` CPU devices (one process of a job)."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices))
    return env
