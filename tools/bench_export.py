"""Host memory of `jaxpost.hf.save_pretrained`: peak RSS above the loaded model while exporting,
against the largest single Hugging Face tensor (the goal: at most that + 20%).

    python tools/bench_export.py --preset=bench-1b --devices=8 [--dtype=bfloat16]

Params are a random init, born sharded over `--devices` CPU devices (fsdp), as a restored
checkpoint would be. On CPU "device" memory is host memory, so the model itself is the baseline:
the peak is read from VmHWM after resetting it (/proc/self/clear_refs) once the model exists and
freed heap is trimmed (glibc `malloc_trim`), and cross-checked by sampling VmRSS in a thread.
Linux only. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import os
import sys


def _args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="bench-1b")
    parser.add_argument("--dtype", default="float32", help="param dtype (exported as is)")
    parser.add_argument("--export_dtype", default=None, help="default: the param dtype")
    parser.add_argument("--devices", type=int, default=8, help="CPU devices the params span")
    parser.add_argument("--out", default=None, help="default: a temporary directory, removed")
    return parser.parse_args()


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def main() -> None:
    args = _args()
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import ctypes
    import gc
    import json
    import math
    import shutil
    import tempfile
    import threading
    import time

    import jax
    import numpy as np

    from jaxpost import hf, sharding
    from jaxpost import model as model_lib
    from jaxpost import step as step_lib

    config = model_lib.preset(args.preset, param_dtype=args.dtype)
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    t0 = time.perf_counter()
    params = step_lib.init_params(model_lib.Decoder(config), mesh, seed=0, seq_len=8)
    jax.block_until_ready(params)
    init_s = time.perf_counter() - t0
    export_dtype = np.dtype(jax.numpy.dtype(args.export_dtype or args.dtype))
    # The largest HF tensor: one layer of a stacked parameter, or a whole unstacked one.
    largest = max(
        math.prod(x.shape[1:] if "layers" in jax.tree_util.keystr(p) else x.shape)
        for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
    )
    largest *= export_dtype.itemsize
    model_bytes = sum(x.nbytes for x in jax.tree.leaves(params))

    gc.collect()
    # Hand freed heap (init's temporaries) back to the OS, so the baseline is the live model and
    # later frees cannot hide the export's own allocations.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS, so VmHWM after the export is the export's own peak
    sampled = [baseline]
    done = threading.Event()

    def sample():
        while not done.is_set():
            sampled.append(_status("VmRSS"))
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out = args.out or tempfile.mkdtemp(prefix="bench-export-")
    t0 = time.perf_counter()
    hf.save_pretrained(out, config, params, dtype=args.export_dtype, overwrite=True)
    export_s = time.perf_counter() - t0
    done.set()
    thread.join()
    hwm = _status("VmHWM")
    written = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    if args.out is None:
        shutil.rmtree(out)
    mib = 2**20
    report = {
        "preset": args.preset,
        "devices": args.devices,
        "param_dtype": args.dtype,
        "export_dtype": export_dtype.name,
        "model_mib": round(model_bytes / mib, 1),
        "largest_tensor_mib": round(largest / mib, 1),
        "baseline_rss_mib": round(baseline / mib, 1),
        "peak_above_model_mib": round((hwm - baseline) / mib, 1),
        "peak_above_model_sampled_mib": round((max(sampled) - baseline) / mib, 1),
        "peak_over_largest": round((hwm - baseline) / largest, 3),
        "written_mib": round(written / mib, 1),
        "init_s": round(init_s, 1),
        "export_s": round(export_s, 1),
        "cpu": _cpu_name(),
    }
    print(json.dumps(report))
    sys.stdout.flush()


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip() + f" ({os.cpu_count()} cores)"
    except OSError:
        pass
    return "unknown"


if __name__ == "__main__":
    main()
