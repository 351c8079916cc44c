"""Metric writers (JSONL, TensorBoard, console) and the peak FLOP/s that MFU divides by.

MFU = (model FLOPs per token x tokens computed, padding included) / elapsed / peak, where the model
FLOPs follow `model.flops_per_token` (6N + attention, PaLM convention) and `peak` is
  * `config.log.peak_flops_per_device` x device count when set;
  * else the vendor's dense bf16 peak of the device kind (TPU v4/v5e/v5p/v6e, A100, H100, H200)
    x device count;
  * on CPU, the float32 matmul throughput measured at startup with all local devices working at
    once (fake CPU devices share the same cores, so this is the machine's peak).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from etils import epath

# Dense bf16 peak FLOP/s per chip (vendor data sheets).
_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA A100": 312e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
}


def measure_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Best float32 matmul FLOP/s with every local device multiplying `[n, n] @ [n, n]` at once.

    Running on all devices together matters on CPU, where the devices share the same cores.
    """
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(devices, ("d",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    x = jax.device_put(jnp.ones((len(devices), n, n), jnp.float32), spec)
    f = jax.jit(lambda a: jnp.einsum("bij,bjk->bik", a, a), out_shardings=spec)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 * len(devices) / best


def peak_flops(configured_per_device: float = 0.0) -> tuple[float, str]:
    """`(peak FLOP/s of all devices, how it was obtained)`."""
    devices = jax.devices()
    if configured_per_device > 0:
        return configured_per_device * len(devices), "config.log.peak_flops_per_device"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        n = jax.process_count()
        return measure_matmul_flops() * n, f"measured float32 matmul, all CPU devices at once x {n}"
    for prefix, peak in sorted(_PEAKS.items(), key=lambda kv: -len(kv[0])):
        if kind.startswith(prefix):
            return peak * len(devices), f"{kind} bf16 data-sheet peak x {len(devices)}"
    return measure_matmul_flops(4096) * jax.process_count(), f"measured float32 matmul on {kind}"


def _format_value(v: float) -> str:
    if v == 0 or 1e-3 <= abs(v) < 1e5:
        return f"{v:.4g}"
    return f"{v:.3e}"


def format_eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class MetricWriter:
    """Appends to WORKDIR/metrics.jsonl and TensorBoard events; silent on non-zero processes.

    `start` is the step the run starts from (0, or the checkpoint it resumed): rows a killed run
    wrote after it -- steps that are now redone -- are dropped (as is a row cut off mid-write),
    and a row at `start` is not written twice, so metrics.jsonl never holds a step twice.
    TensorBoard drops them too (`purge_step`).

    A remote workdir (`gs://...`) gets metrics.jsonl rewritten whole at most every 30 s and at
    close (object stores cannot append), and TensorBoard events written locally and copied to
    WORKDIR/tensorboard at the same moments.
    """

    def __init__(
        self, workdir: str, *, tensorboard: bool = True, enabled: bool = True, start: int = 0
    ):
        self._enabled = enabled
        self._jsonl = None
        self._remote = None
        self._rows: list[str] = []
        self._last_flush = time.monotonic()
        self._tb = self._tb_local = self._tb_remote = None
        self._start_keys: set[str] = set()  # keys already on record at step `start`
        self.redone: int | None = None  # the last step a killed run logged beyond `start`
        self._start = start
        if not enabled:
            return
        path = epath.Path(workdir) / "metrics.jsonl"
        self._rows = self._kept_rows(path, start) if path.exists() else []
        if "://" in workdir:
            self._remote = path
            self._tb_local = tempfile.mkdtemp(prefix="jaxpost-tensorboard-")
            self._tb_remote = epath.Path(workdir) / "tensorboard"
            tb_dir = self._tb_local
        else:
            tmp = path.with_name("metrics.jsonl.tmp")
            tmp.write_text("".join(r + "\n" for r in self._rows))
            os.replace(tmp, path)  # never a moment without the kept rows
            self._jsonl = open(path, "a")
            self._rows = []
            tb_dir = os.path.join(workdir, "tensorboard")
        if tensorboard:
            from tensorboardX import SummaryWriter

            # events of steps after `start` (all of them when starting over) are dropped
            self._tb = SummaryWriter(tb_dir, purge_step=start + 1 if start else 0)

    def _kept_rows(self, path: epath.Path, start: int) -> list[str]:
        kept = []
        for line in path.read_text().splitlines():
            try:
                step = int(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue  # cut off by a kill mid-write
            if start and step <= start:
                kept.append(line)
                if step == start:
                    self._start_keys.update(json.loads(line))
            else:
                self.redone = max(self.redone or 0, step)
        return kept

    def has_at_start(self, key: str) -> bool:
        """Whether the rows kept at the start step hold `key`."""
        return key in self._start_keys

    def write(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self._enabled:
            return
        if self._start_keys and step == self._start:
            scalars = {k: v for k, v in scalars.items() if k not in self._start_keys}
            if not scalars:
                return
        record = json.dumps({"step": int(step), **{k: float(v) for k, v in scalars.items()}})
        if self._remote is not None:
            self._rows.append(record)
            # Object stores cannot append and limit writes per object: rewrite at most every
            # 30 s (and at close).
            if time.monotonic() - self._last_flush > 30:
                self.flush()
        else:
            self._jsonl.write(record + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, float(v), int(step))

    def flush(self) -> None:
        """Everything written so far on disk (in the workdir, remote ones included)."""
        if not self._enabled:
            return
        if self._tb is not None:
            self._tb.flush()
        if self._remote is not None:
            self._remote.write_text("".join(r + "\n" for r in self._rows))
            if self._tb_local is not None:
                self._tb_remote.mkdir(parents=True, exist_ok=True)
                for f in os.listdir(self._tb_local):
                    src = epath.Path(self._tb_local) / f
                    src.copy(self._tb_remote / f, overwrite=True)
        self._last_flush = time.monotonic()

    def close(self) -> None:
        if not self._enabled:
            return
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()


class Throughput:
    """Tokens/s and MFU over the steps since the last `restart`, so that pauses (compilation,
    evaluation, checkpointing) never count: the loop restarts it after each of them."""

    def __init__(self, flops_per_step: float, peak_flops: float):
        self.flops_per_step, self.peak_flops = flops_per_step, peak_flops
        self.restart()

    def restart(self) -> None:
        self.tokens, self.steps, self.t0 = 0.0, 0, time.perf_counter()

    def add(self, tokens: float) -> None:
        self.tokens += tokens
        self.steps += 1

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.t0) / self.steps if self.steps else 0.0

    def rates(self) -> dict[str, float]:
        """`tokens_per_sec`, `mfu` and `seconds_per_step` of the window (empty when it holds
        no step)."""
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.t0
        return {
            "tokens_per_sec": self.tokens / elapsed,
            "mfu": self.flops_per_step * self.steps / elapsed / self.peak_flops,
            "seconds_per_step": elapsed / self.steps,
        }


def console_line(step: int, num_steps: int, scalars: Mapping[str, float], eta_s: float) -> str:
    shown = ["loss", "grad_norm", "learning_rate", "tokens_per_sec", "mfu"]
    parts = [f"step {step}/{num_steps}"]
    for k in shown:
        if k in scalars:
            v = scalars[k]
            if k == "mfu":
                parts.append(f"mfu {100 * v:.1f}%")
            elif k == "tokens_per_sec":
                parts.append(f"{v:,.0f} tok/s")
            else:
                parts.append(f"{k} {_format_value(v)}")
    parts.append(f"eta {format_eta(eta_s)}")
    return " | ".join(parts)
