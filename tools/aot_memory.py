"""Memory per chip of train steps compiled for TPU slices on this (CPU) machine.

  pip install 'jaxpost[tpu-aot]'   # libtpu: compiles for TPUs without one
  JAX_PLATFORMS=cpu python tools/aot_memory.py [--only ROW_SUBSTRING ...] [--json OUT.jsonl]

Each row is `jaxpost plan` (`jaxpost.memory`) for one preset x objective x seq_len x topology:
one sequence (pair) per chip unless it says `xN/chip`, bf16 compute, float32 master weights
and Adam state, the whole slice on the fsdp axis. Prints a Markdown table (per-chip
temporaries, arguments, peak vs HBM; a compile that runs out of memory is "does not fit: needed
> available") and the collective instructions of each compiled step. Compiles take minutes
each on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from jaxpost import config as config_lib
from jaxpost import memory

# Llama 3 8B's shape (untied 128k vocabulary; RoPE scaling does not change memory).
LLAMA3_8B = dict(
    vocab_size=128256,
    d_model=4096,
    n_layers=32,
    n_heads=32,
    n_kv_heads=8,
    head_dim=128,
    mlp_dim=14336,
    rope_theta=500000.0,
    rms_eps=1e-5,
    tie_embeddings=False,
)


@dataclasses.dataclass(frozen=True)
class Row:
    preset: str  # a jaxpost.model preset, or "llama3-8b"
    objective: str  # configs/<objective>.py
    seq_len: int
    topology: str
    remat: str = "none"
    mesh: tuple[int, int] = (1, -1)  # (data, fsdp)
    chunk: int = 0  # objective.logits_chunk_size: 0 = full logits, -1 = auto (the default)
    attention: str = "xla"  # model.attention; "auto" picks splash attention on TPUs
    per_chip: int = 1  # sequences (pairs) per chip
    shared: bool = False  # objective.shared_prompt (packed rows of 2 x seq_len)

    @property
    def name(self) -> str:
        data, fsdp = self.mesh
        mesh = "" if self.mesh == (1, -1) else f" data={data} fsdp={fsdp}"
        chunk = (
            "" if self.chunk == 0 else f" logits_chunk={'auto' if self.chunk < 0 else self.chunk}"
        )
        extra = (f" x{self.per_chip}/chip" if self.per_chip != 1 else "") + (
            " shared_prompt" if self.shared else ""
        )
        if self.attention != "xla":
            extra += f" attention={self.attention}"
        return (
            f"{self.preset} {self.objective} {self.seq_len} {self.topology} "
            f"remat={self.remat}{mesh}{chunk}{extra}"
        )


ROWS = (
    # v5p-128 = 64 chips (v5p:4x4x4): v4/v5p slice names count TensorCores, two per chip
    Row("bench-1b", "sft", 2048, "v5p-128"),
    Row("bench-1b", "sft", 2048, "v5p-128", "full"),
    Row("bench-1b", "sft", 8192, "v5p-128"),
    Row("bench-1b", "sft", 8192, "v5p-128", "full"),
    Row("bench-1b", "dpo", 2048, "v5p-128"),
    Row("bench-1b", "sft", 2048, "v5p-128", mesh=(4, 16)),
    Row("bench-1b", "sft", 2048, "v5p-64"),
    Row("llama3-8b", "sft", 8192, "v5p-128", "full"),
    # The default since: objective.logits_chunk_size=-1 (auto) chunks the logits on TPUs.
    Row("bench-1b", "sft", 2048, "v5p-128", chunk=-1),
    Row("bench-1b", "dpo", 2048, "v5p-128", chunk=-1),
    Row("llama3-8b", "sft", 8192, "v5p-128", "full", chunk=-1),
    # Splash attention (model.attention=auto on TPUs): no [B, H, L, L] scores.
    Row("bench-1b", "sft", 8192, "v5p-128", attention="auto"),
    Row("bench-1b", "sft", 8192, "v5p-128", "full", attention="auto"),
    Row("bench-1b", "sft", 8192, "v5p-128", chunk=-1, attention="auto"),
    # Equal tokens per step (issue 12's memory target: pairs <= 1.1x SFT): two sequences per
    # chip for SFT, one pair for DPO (precomputed reference) and RM; today's defaults.
    Row("bench-1b", "sft", 2048, "v5p-128", chunk=-1, attention="auto", per_chip=2),
    Row("bench-1b", "dpo", 2048, "v5p-128", chunk=-1, attention="auto"),
    Row("bench-1b", "rm", 2048, "v5p-128", chunk=-1, attention="auto"),
    # Shared prompts take XLA attention (a mask splash cannot express): rows of 4096 tokens.
    Row("bench-1b", "sft", 2048, "v5p-128", chunk=-1, per_chip=2),
    Row("bench-1b", "dpo", 2048, "v5p-128", chunk=-1, shared=True),
    # ... or blockwise attention (jaxpost/blockwise.py): takes the mask, keeps no weights.
    Row("bench-1b", "sft", 2048, "v5p-128", chunk=-1, per_chip=2, attention="blockwise"),
    Row("bench-1b", "dpo", 2048, "v5p-128", chunk=-1, shared=True, attention="blockwise"),
)


def row_config(row: Row):
    config = config_lib.load_config(f"configs/{row.objective}.py")
    target = memory.parse_target(row.topology)
    if row.preset == "llama3-8b":
        model = {**config_lib.model_section("bench-1b"), **LLAMA3_8B}
    else:
        model = config_lib.model_section(row.preset)
    model.update(dtype="bfloat16", param_dtype="float32", remat=row.remat, attention=row.attention)
    config.model = model
    data, fsdp = row.mesh
    config_lib.apply_overrides(
        config,
        [
            f"data.seq_len={row.seq_len}",
            f"train.global_batch={target.chips * row.per_chip}",
            "train.accum_steps=1",
            f"eval.batch_size={target.chips}",
            f"mesh.data={data}",
            f"mesh.fsdp={fsdp}",
            "mesh.tensor=1",
            f"objective.logits_chunk_size={row.chunk}",
            f"objective.shared_prompt={row.shared}",
            f"data.packing={'first_fit' if row.shared else 'none'}",
        ],
    )
    return config


def run_row(row: Row) -> dict:
    start = time.perf_counter()
    setup = memory.make_setup(row_config(row), memory.parse_target(row.topology))
    _, report = memory.compile_step(setup)
    return {
        "row": row.name,
        "chips": setup.target.chips,
        "mesh": report.mesh_shape,
        "temp": report.temp,
        "arguments": report.arguments,
        "peak": report.peak,
        "available": report.available,
        "fits": report.fits,
        "verdict": memory.verdict(report),
        "collectives": report.collectives,
        "compile_s": round(time.perf_counter() - start, 1),
    }


def _gib(n) -> str:
    return "-" if n is None else f"{n / memory.GiB:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", default=[], help="rows whose name has this")
    parser.add_argument("--json", default="", help="also append each result to this JSONL file")
    args = parser.parse_args()
    rows = [r for r in ROWS if not args.only or any(s in r.name for s in args.only)]
    results = []
    for row in rows:
        result = run_row(row)
        print(json.dumps(result), flush=True)
        if args.json:
            with open(args.json, "a", encoding="utf-8") as f:
                f.write(json.dumps(result) + "\n")
        results.append(result)
    print(
        "\n| preset objective seq topology | chips | temp GiB/chip | args GiB/chip | peak vs HBM |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['row']} | {r['chips']} | {_gib(r['temp'])} | {_gib(r['arguments'])} | "
            f"{r['verdict']} |"
        )
    print("\n| row | collectives |\n|---|---|")
    for r in results:
        kinds = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "-"
        print(f"| {r['row']} | {kinds} |")


if __name__ == "__main__":
    main()
