"""Data pipeline throughput (no model): examples/s and tokens/s out of the grain iterator.

  python tools/bench_data.py --data builtin:sort --seq 256 --batch 16 [--packing first_fit]

Reports tokens/s twice: real (non-padding) tokens, and row slots (batch x seq) -- the second is
what a train step consumes. Compare with `tools/bench.py` on the same model and shapes: the
pipeline must produce well over 10x what the step eats, so it never starves the step.
Startup (opening the source: validating every raw record, or reading a prepared dataset's
manifest and index) is timed separately; examples are tokenised (raw) or decoded (prepared) in
the pipeline, so both are in the tokens/s.
"""

from __future__ import annotations

import argparse
import json
import time

from jaxpost.data import pipeline
from jaxpost.data.tokenizer import ByteTokenizer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data",
        default="builtin:sort",
        help="JSONL path/glob, builtin:NAME or a prepared dataset directory",
    )
    parser.add_argument("--kind", default="sft", choices=pipeline.KINDS)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--packing", default="none", choices=pipeline.PACKINGS)
    parser.add_argument("--segments", type=int, default=32, help="max segments per packed row")
    parser.add_argument("--bins", type=int, default=64)
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args(argv)

    t0 = time.perf_counter()
    examples, stats = pipeline.open_examples(
        args.data,
        "train",
        pipeline.TokenizerHandle({"tokenizer": "byte"}, ByteTokenizer()),
        pipeline.Settings(args.kind, args.seq),
    )
    startup = time.perf_counter() - t0
    it = pipeline.make_train_iterator(
        examples,
        seq_len=args.seq,
        micro_batch=args.batch,
        accum_steps=1,
        seed=0,
        num_workers=args.workers,
        packing=args.packing,
        segments_per_row=args.segments,
        packing_bins=args.bins,
        kind=args.kind,
    )
    next(it)  # warm up (and start workers)
    batches = real_tokens = sequences = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        b = next(it)
        seg = b["segment_ids"]
        batches += 1
        real_tokens += int((seg > 0).sum())
        sequences += int(seg.max(axis=-1).sum())  # segments are numbered 1..k per row
    elapsed = time.perf_counter() - t0
    slots = batches * args.batch * args.seq * (2 if pipeline.is_pairs(args.kind) else 1)
    print(
        json.dumps(
            {
                "data": args.data,
                "kind": args.kind,
                "seq": args.seq,
                "batch": args.batch,
                "packing": args.packing,
                "workers": args.workers,
                "records": stats.records,
                "startup_s": round(startup, 2),
                "batches_per_s": round(batches / elapsed, 1),
                "examples_per_s": round(sequences / elapsed, 1),
                "real_tokens_per_s": round(real_tokens / elapsed, 1),
                "slot_tokens_per_s": round(slots / elapsed, 1),
                "fill": round(real_tokens / slots, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
