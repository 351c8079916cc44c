"""Train-step throughput benchmark on synthetic tokens (no data pipeline).

  python tools/bench.py --objective sft --model bench-tiny --batch 16 --seq 256 [--steps 10]

--objective rm|dpo runs pairs (`--batch` pairs of two sequences; DPO with precomputed reference
log-probs, its default). Prints one JSON line: step time, tokens/s (per chip and total), MFU
against the peak that
`jaxpost.metrics.peak_flops` reports (data-sheet bf16 peak on TPU/GPU; measured float32 matmul on
CPU), and peak device memory where the backend reports it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import flax.linen as nn
import jax
import numpy as np

from jaxpost import config as config_lib
from jaxpost import metrics, objectives, optim, sharding
from jaxpost import model as model_lib
from jaxpost import step as step_lib


def synthetic_batch(
    objective_name: str, batch: int, seq: int, vocab: int, accum: int, seed=0, targets=1.0
):
    """Random tokens in the objective's batch layout: `[A, B, L]` (SFT) or `[A, B, 2, L]` pairs
    (RM, DPO; with precomputed reference log-probs for DPO, as its default config uses). The
    last `targets` fraction of each row carries the loss (the rest is a prompt)."""
    rng = np.random.default_rng(seed)
    shape = (accum, batch // accum) + ((2,) if objective_name in ("rm", "dpo") else ())
    tokens = rng.integers(3, vocab, size=(*shape, seq + 1), dtype=np.int32)
    ones = np.ones((*shape, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), ones.shape).copy()
    loss_mask = (positions >= seq - round(targets * seq)).astype(np.int32)
    out = {
        "inputs": tokens[..., :-1],
        "targets": tokens[..., 1:],
        "loss_mask": loss_mask,
        "segment_ids": ones,
        "positions": positions,
    }
    if objective_name == "dpo":
        out["ref_logps"] = rng.normal(-seq * 5.0, 1.0, size=(*shape[:2], 1, 2)).astype(np.float32)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objective", default="sft", choices=["sft", "rm", "dpo"])
    parser.add_argument(
        "--logits_chunk",
        type=int,
        default=0,
        help="objective.logits_chunk_size (0 = full [B, L, V] logits)",
    )
    parser.add_argument("--model", default="bench-tiny", choices=sorted(model_lib.PRESETS))
    parser.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--accum", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--dtype", default="float32", help="activation dtype (bfloat16 on TPU/GPU)")
    parser.add_argument("--remat", default="none", choices=sorted(model_lib.REMAT_POLICIES))
    parser.add_argument("--mesh", default="-1,1,1", help="data,fsdp,tensor")
    parser.add_argument("--attention", default="auto", choices=list(model_lib.ATTENTION_KERNELS))
    parser.add_argument(
        "--targets", type=float, default=1.0, help="fraction of each row that carries the loss"
    )
    args = parser.parse_args()

    config = config_lib.base_config()
    config.objective.name = args.objective
    config.objective.logits_chunk_size = args.logits_chunk
    model_config = model_lib.preset(
        args.model, dtype=args.dtype, remat=args.remat, attention=args.attention
    )
    config.model = dataclasses.asdict(model_config)
    mesh = sharding.make_mesh(dict(zip(sharding.AXES, map(int, args.mesh.split(",")), strict=True)))
    objective = objectives.make_objective(config.objective, model_config)
    model = objective.model
    tx = optim.make_optimizer(config.optim, 1000)
    schedule = optim.make_schedule(config.optim, 1000)
    batch_np = synthetic_batch(
        args.objective, args.batch, args.seq, model_config.vocab_size, args.accum,
        targets=args.targets,
    )  # fmt: skip
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.LOGICAL_RULES):
        state, shardings = step_lib.create_state(model, tx, mesh, seed=0, seq_len=args.seq)
        step = step_lib.make_train_step(
            objective, tx, schedule, state_shardings=shardings, mesh=mesh
        )
        batch = sharding.to_global(batch_np, mesh)
        t0 = time.perf_counter()
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        compile_s = time.perf_counter() - t0
        state, m = step(state, batch, None)
        jax.block_until_ready(m)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            state, m = step(state, batch, None)
        jax.block_until_ready((state, m))
        step_s = (time.perf_counter() - t0) / args.steps
    peak, peak_source = metrics.peak_flops()
    sequences = args.batch * (2 if args.objective in ("rm", "dpo") else 1)
    tokens = sequences * args.seq
    flops = model_lib.flops_per_token(model_config, args.seq, lm_head=args.objective != "rm")
    flops *= tokens
    mem = jax.devices()[0].memory_stats() or {}
    print(
        json.dumps(
            {
                "objective": args.objective,
                "model": args.model,
                "batch": args.batch,
                "seq": args.seq,
                "dtype": args.dtype,
                "remat": args.remat,
                "logits_chunk": args.logits_chunk,
                "targets": args.targets,
                "attention": model_lib.attention_kernel(model_config),
                "mesh": dict(mesh.shape),
                "device": jax.devices()[0].device_kind,
                "n_devices": jax.device_count(),
                "params": model_lib.count_params(state.params),
                "compile_s": round(compile_s, 2),
                "step_s": round(step_s, 4),
                "tokens_per_s": round(tokens / step_s, 1),
                "tokens_per_s_per_chip": round(tokens / step_s / jax.device_count(), 1),
                "mfu": round(flops / step_s / peak, 4),
                "peak_flops": peak,
                "peak_source": peak_source,
                "peak_bytes_in_use": mem.get("peak_bytes_in_use"),
                "loss": float(m["loss"]),
            }
        )
    )


if __name__ == "__main__":
    main()
