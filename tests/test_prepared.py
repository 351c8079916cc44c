"""Token-level prepared datasets (`jaxpost data prepare`): the same examples as the raw records
at every sequence length and truncation, no record read to open them, bad datasets refused."""

import json
import os

import numpy as np
import pytest
from conftest import REPO

from jaxpost import main
from jaxpost.data import pipeline, prepared, records
from jaxpost.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()
BYTE = {"tokenizer": "byte"}


def _chats(n):
    return [
        {
            "messages": [
                {"role": "user", "content": f"q{i} " + "w" * (i % 9)},
                {"role": "assistant", "content": f"a{i} " + "z" * (i * 5 % 13)},
            ]
        }
        for i in range(n)
    ]


def _pairs(n):
    return [
        {"prompt": f"p{i} " + "w" * (i % 11), "chosen": "y" * (i % 5 + 1), "rejected": f"n{i}"}
        for i in range(n)
    ]


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def _same(a, b):
    if isinstance(a, pipeline.PairExample):
        return _same(a.chosen, b.chosen) and _same(a.rejected, b.rejected)
    return np.array_equal(a.ids, b.ids) and np.array_equal(a.mask, b.mask)


@pytest.mark.parametrize("kind", ["sft", "pairs"])
def test_prepared_examples_equal_the_raw_records_at_every_length_and_truncation(tmp_path, kind):
    rows = _chats(40) if kind == "sft" else _pairs(40)
    raw = _write(tmp_path / "raw.jsonl", rows)
    out = str(tmp_path / "ds")
    manifest = prepared.prepare([raw], out, BYTE, workers=1, records_per_task=7)
    assert manifest["kind"] == kind and manifest["splits"]["train"]["records"] == 40
    assert len(manifest["splits"]["train"]["shards"]) == 6  # 40 records, 7 per task
    assert sum(manifest["splits"]["train"]["length_histogram"].values()) == 40
    handle = pipeline.TokenizerHandle(BYTE, TOK)
    for seq_len in (12, 20, 64):
        for truncation in pipeline.TRUNCATIONS:
            settings = pipeline.Settings(kind, seq_len, truncation)
            got, stats = pipeline.open_examples(out, "train", handle, settings)
            want, want_stats = pipeline.open_examples(raw, "train", handle, settings)
            assert len(got) == len(want), (seq_len, truncation)
            assert all(_same(g, w) for g, w in zip(got, want, strict=True))
            assert (stats.records, stats.dropped, stats.truncated) == (
                want_stats.records,
                want_stats.dropped,
                want_stats.truncated,
            )
            if not stats.truncated:
                assert stats.target_tokens == want_stats.target_tokens
    # A slice of the prepared split is the same slice of the records.
    settings = pipeline.Settings(kind, 64)
    got, _ = pipeline.open_examples(f"{out}[10:20]", "train", handle, settings)
    want, _ = pipeline.open_examples(f"{raw}[10:20]", "train", handle, settings)
    assert len(got) == 10 and all(_same(g, w) for g, w in zip(got, want, strict=True))


def test_prepare_cli_with_workers_holds_out_eval_and_trains_reads_it(tmp_path):
    """Two worker processes; the eval hold-out and the train split together are the records;
    `DIR/eval` names the split; errors name the record."""
    raw = _write(tmp_path / "raw.jsonl", _chats(30))
    out = str(tmp_path / "ds")
    manifest = main.main(
        [
            "data",
            "prepare",
            f"--config={REPO}/configs/sft.py:smoke",
            f"--input={raw}",
            f"--out={out}",
            "--eval_fraction=0.2",
            "--workers=2",
        ]
    )
    assert {k: v["records"] for k, v in manifest["splits"].items()} == {"train": 24, "eval": 6}
    handle = pipeline.TokenizerHandle(BYTE, TOK)
    settings = pipeline.Settings("sft", 128)
    train, _ = pipeline.open_examples(out, "train", handle, settings)
    held, _ = pipeline.open_examples(f"{out}/eval", "train", handle, settings)
    everything, _ = pipeline.open_examples(raw, "train", handle, settings)
    key = lambda e: e.ids.tobytes()  # noqa: E731
    assert sorted(map(key, [*train, *held])) == sorted(map(key, everything))
    # The spawn pool (2 workers, 3 tasks) writes the same dataset as one process.
    pooled = prepared.prepare(
        [raw], str(tmp_path / "pooled"), BYTE, eval_fraction=0.2, workers=2, records_per_task=10
    )
    for split in ("train", "eval"):
        assert pooled["splits"][split]["digest"] == manifest["splits"][split]["digest"]
    # Record order is part of what a dataset is (reference log-probs are cached by it).
    half = _write(tmp_path / "half.jsonl", _chats(30)[15:])
    first = _write(tmp_path / "first.jsonl", _chats(30)[:15])
    ab = prepared.prepare([first, half], str(tmp_path / "ab"), BYTE, workers=1)
    ba = prepared.prepare([half, first], str(tmp_path / "ba"), BYTE, workers=1)
    assert ab["splits"]["train"]["digest"] != ba["splits"]["train"]["digest"]
    bad = _write(tmp_path / "bad.jsonl", [*_chats(3), {"messages": "oops"}])
    with pytest.raises(records.DataError, match=r"bad.jsonl:4: field 'messages' must be"):
        prepared.prepare([bad], str(tmp_path / "bad"), BYTE, workers=1)
    assert not os.path.exists(tmp_path / "bad")  # nothing half-written is left
    manifest = prepared.prepare([bad], str(tmp_path / "bad"), BYTE, workers=1, skip_invalid=True)
    assert manifest["skipped"] == 1 and manifest["splits"]["train"]["records"] == 3


def test_bad_prepared_datasets_are_refused_naming_the_file(tmp_path):
    raw = _write(tmp_path / "raw.jsonl", _chats(12))
    out = tmp_path / "ds"
    prepared.prepare([raw], str(out), BYTE, workers=1, records_per_task=4)
    handle = pipeline.TokenizerHandle(BYTE, TOK)
    sft = pipeline.Settings("sft", 64)
    with pytest.raises(FileExistsError, match="exists and is not empty"):
        prepared.prepare([raw], str(out), BYTE, workers=1)
    with pytest.raises(prepared.PreparedDataError, match="holds sft examples; this objective"):
        pipeline.open_examples(str(out), "train", handle, pipeline.Settings("pairs", 64))
    with pytest.raises(prepared.PreparedDataError, match="has no split 'eval'"):
        pipeline.open_examples(str(out), "eval", handle, sft)
    qwen = {"tokenizer": str(REPO / "tests" / "fixtures" / "tokenizers" / "qwen2_5")}
    with pytest.raises(prepared.PreparedDataError, match="prepared with tokenizer settings"):
        pipeline.open_examples(str(out), "train", pipeline.TokenizerHandle(qwen), sft)
    shard = out / "train-00001-of-00003.array_record"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(prepared.PreparedDataError, match="00001-of-00003.array_record: .* bytes"):
        pipeline.open_examples(str(out), "train", handle, sft)
    shard.unlink()
    with pytest.raises(prepared.PreparedDataError, match="00001-of-00003.array_record: missing"):
        pipeline.open_examples(str(out), "train", handle, sft)
    (out / "manifest.json").unlink()
    with pytest.raises(prepared.PreparedDataError, match="no manifest.json .not a prepared"):
        pipeline.open_examples(str(out), "train", handle, sft)


def test_a_run_trains_from_a_prepared_dataset_like_from_its_records(tmp_path):
    """SFT with packing over a prepared dataset gives the losses of the same run over the raw
    records (same examples in the same order)."""
    from conftest import smoke_config

    from jaxpost import train as train_lib

    raw = _write(tmp_path / "raw.jsonl", _chats(64))
    out = str(tmp_path / "ds")
    prepared.prepare([raw], out, BYTE, workers=1)
    losses = []
    for path in (raw, out):
        config = smoke_config(
            **{
                "train.num_steps": 3,
                "data.train_path": path,
                "data.eval_path": "",
                "data.packing": "first_fit",
                "log.tensorboard": False,
            }
        )
        summary = train_lib.train(config, str(tmp_path / f"run{len(losses)}"))
        losses.append(summary["last_train_metrics"]["loss"])
        assert summary["train_data"]["records"] == 64
    assert losses[0] == losses[1]


def test_malformed_json_and_invalid_utf8_lines_are_skipped_and_counted_when_asked(tmp_path):
    """Under data.skip_invalid a broken line is one more invalid record, in a run's raw data
    and in `data prepare`; without it, the error names the file and line."""
    path = tmp_path / "broken.jsonl"
    good = [json.dumps(r) for r in _chats(4)]
    path.write_bytes(
        "\n".join([good[0], '{"messages": [', good[1]]).encode()
        + b'\n{"text": "caf\xe9"}\n'
        + "\n".join(good[2:]).encode()
        + b"\n"
    )
    with pytest.raises(records.DataError, match=rf"{path}:2: malformed JSON"):
        pipeline.load_sft_examples(str(path), "train", TOK, seq_len=64)
    examples, stats = pipeline.load_sft_examples(
        str(path), "train", TOK, seq_len=64, skip_invalid=True
    )
    assert len(examples) == 4 and stats.records == 6 and stats.skipped == 2
    reasons = " ".join(stats.skip_reasons)
    assert "malformed JSON" in reasons and "invalid UTF-8" in reasons
    manifest = prepared.prepare(
        [str(path)], str(tmp_path / "p"), BYTE, workers=1, skip_invalid=True
    )
    assert manifest["skipped"] == 2 and manifest["splits"]["train"]["records"] == 4
