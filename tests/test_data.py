"""SFT data: TRL record formats, loss masks, fixed shapes, process sharding, bad input."""

import json

import numpy as np
import pytest

from jaxpost.data import builtin, pipeline, records, sources
from jaxpost.data.tokenizer import ASSISTANT, BOS, END, EOS, USER, ByteTokenizer

TOK = ByteTokenizer()


def _targets(ids, mask):
    return TOK.decode([i for i, m in zip(ids, mask, strict=True) if m], skip_special=False)


def test_conversation_trains_on_assistant_turns_only():
    record = {
        "messages": [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": "ok"},
        ]
    }
    ids, mask = records.tokenize_sft(record, TOK, "x:1")
    assert ids[0] == BOS and ids[-1] == EOS
    assert ids.count(USER) == 2 and ids.count(ASSISTANT) == 2 and ids.count(END) == 5
    assert _targets(ids, mask) == "yo<|end|>ok<|end|><eos>"
    assert TOK.decode(ids) == "Shiyoagainok"


def test_prompt_completion_strings_and_conversations():
    ids, mask = records.tokenize_sft({"prompt": "2+2=", "completion": "4"}, TOK, "x:1")
    assert ids == [BOS, *TOK.encode("2+2=4"), EOS]
    assert _targets(ids, mask) == "4<eos>"
    conv = {
        "prompt": [{"role": "user", "content": "q"}],
        "completion": [{"role": "assistant", "content": "a"}],
    }
    ids, mask = records.tokenize_sft(conv, TOK, "x:1")
    assert _targets(ids, mask) == "a<|end|><eos>"


def test_language_modeling_text_trains_on_everything_after_bos():
    ids, mask = records.tokenize_sft({"text": "abc", "id": 7}, TOK, "x:1")
    assert mask == [0, 1, 1, 1, 1]


def test_rows_are_shifted_and_padded_to_a_fixed_length():
    ex = pipeline.Example(
        np.array([1, 10, 11, 12, 2], np.int32), np.array([0, 0, 1, 1, 1], np.int32)
    )
    row = pipeline.to_row(ex, 8)
    assert row["inputs"].tolist() == [1, 10, 11, 12, 0, 0, 0, 0]
    assert row["targets"].tolist() == [10, 11, 12, 2, 0, 0, 0, 0]
    assert row["loss_mask"].tolist() == [0, 1, 1, 1, 0, 0, 0, 0]
    assert row["segment_ids"].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert row["positions"].tolist() == [0, 1, 2, 3, 0, 0, 0, 0]


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "malformed JSON"),
        ('{"prompt": "p"}', "missing field 'completion'"),
        ('{"prompt": "p", "completion": ""}', "empty completion"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "unknown role 'robot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "no tokens to train on"),
        ('{"messages": [{"role": "assistant", "content": ""}]}', "empty content"),
        ('{"txt": "typo"}', "matches no SFT format"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_bad_records_are_reported_with_file_and_line(tmp_path, line, problem):
    path = tmp_path / "train.jsonl"
    good = json.dumps({"text": "fine"})
    path.write_text(f"{good}\n\n{line}\n")
    with pytest.raises(records.DataError) as e:
        pipeline.load_sft_examples(str(path), "train", TOK, seq_len=64)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value)


def test_invalid_utf8_is_reported(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff"}\n')
    with pytest.raises(records.DataError, match=r"bad.jsonl:2: invalid UTF-8"):
        pipeline.load_sft_examples(str(path), "train", TOK, seq_len=64)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(FileNotFoundError, match="No data file matches"):
        list(sources.read_records(str(tmp_path / "nope*.jsonl"), "train"))
    with pytest.raises(ValueError, match="known: builtin:arithmetic"):
        list(sources.read_records("builtin:nope", "train"))


def test_truncation_and_dropping_are_counted(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "x" * n}) for n in (3, 20, 5)) + "\n")
    ex, stats = pipeline.load_sft_examples(str(path), "train", TOK, seq_len=8)
    assert (stats.records, stats.truncated, len(ex)) == (3, 1, 3)
    assert max(len(e.ids) for e in ex) == 9
    ex, stats = pipeline.load_sft_examples(str(path), "train", TOK, seq_len=8, truncation="drop")
    assert (stats.dropped, len(ex)) == (1, 2)
    with pytest.raises(ValueError, match="no usable examples"):
        pipeline.load_sft_examples(str(path), "train", TOK, seq_len=2, truncation="drop")


def test_glob_reads_several_files_in_order(tmp_path):
    for i in range(2):
        (tmp_path / f"part{i}.jsonl").write_text(json.dumps({"text": f"file{i}"}) + "\n")
    ex, stats = pipeline.load_sft_examples(str(tmp_path / "part*.jsonl"), "train", TOK, seq_len=16)
    assert stats.records == 2 and TOK.decode(ex[1].ids) == "file1"


def test_processes_read_disjoint_shares_and_batches_have_fixed_shapes():
    examples = [
        pipeline.Example(np.array([1, 8 + i, 2], np.int32), np.array([0, 1, 1], np.int32))
        for i in range(40)
    ]
    seen = []
    for p in range(2):
        it = pipeline.make_train_iterator(
            examples,
            seq_len=6,
            micro_batch=5,
            accum_steps=2,
            seed=0,
            process_index=p,
            process_count=2,
        )
        batches = [next(it), next(it)]  # 2 batches x 10 rows = this process's 20 examples
        assert all(v.shape == (2, 5, 6) and v.dtype == np.int32 for v in batches[0].values())
        seen.append([int(x) for b in batches for x in b["inputs"][:, :, 1].ravel()])
    assert all(len(set(s)) == 20 for s in seen)  # no repeats within an epoch
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 40


def test_eval_batches_cover_every_example_once():
    examples = [pipeline.Example(np.array([1, 9, 2], np.int32), np.array([0, 1, 1], np.int32))] * 7
    batches = pipeline.make_eval_batches(examples, seq_len=4, micro_batch=4)
    assert len(batches) == 2 and batches[0]["inputs"].shape == (1, 4, 4)
    assert sum(int(b["loss_mask"].sum()) for b in batches) == 7 * 2


def test_builtin_eval_split_is_held_out():
    for task in ("arithmetic", "reverse", "sort", "sort_prefs", "reverse_prefs"):
        train = {json.dumps(r) for r in builtin.BUILTIN_TASKS[task]("train")}
        held = [json.dumps(r) for r in builtin.BUILTIN_TASKS[task]("eval")]
        assert held and not train & set(held)


def test_processes_never_overlap_when_examples_do_not_divide_evenly():
    examples = [
        pipeline.Example(np.array([1, 8 + i, 2], np.int32), np.array([0, 1, 1], np.int32))
        for i in range(7)
    ]
    its = [
        pipeline.make_train_iterator(
            examples,
            seq_len=4,
            micro_batch=1,
            accum_steps=1,
            seed=0,
            process_index=p,
            process_count=2,
        )
        for p in range(2)
    ]
    for _ in range(9):  # three epochs of 3 examples per process
        a, b = (int(next(it)["inputs"][0, 0, 1]) for it in its)
        assert a != b


def test_mixtures_draw_in_proportion_and_parse_strictly(tmp_path):
    assert pipeline.parse_mixture("a.jsonl@3, builtin:sort") == [
        ("a.jsonl", 3.0),
        ("builtin:sort", 1.0),
    ]
    with pytest.raises(ValueError, match="weight 'x' of 'a.jsonl' is not a number"):
        pipeline.parse_mixture("a.jsonl@x")
    with pytest.raises(ValueError, match="must be positive"):
        pipeline.parse_mixture("a.jsonl@0")
    path = tmp_path / "b.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"b{i}"}) for i in range(5)) + "\n")
    sources, weights, stats = pipeline.load_mixture(
        f"builtin:sort@3,{path}@1",
        "train",
        pipeline.TokenizerHandle({"tokenizer": "byte"}, TOK),
        pipeline.Settings("sft", 32),
    )
    assert [len(s) for s in sources] == [4000, 5] and weights == [3.0, 1.0]
    assert stats.records == 4005
    it = pipeline.make_train_iterator(
        sources, mixture_weights=weights, seq_len=32, micro_batch=8, accum_steps=1, seed=0
    )
    from_b = sum(int((next(it)["inputs"][0, :, 1] == TOK.encode("b")[0]).sum()) for _ in range(50))
    assert from_b == 100  # exactly 1 in 4 of 400 rows: grain mixes deterministically


def test_sliced_splits_partition_one_file(tmp_path):
    path = tmp_path / "all.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"r{i}"}) for i in range(10)) + "\n")
    train, _ = pipeline.load_examples(f"{path}[:80%]", "train", TOK, seq_len=16)
    held, _ = pipeline.load_examples(f"{path}[80%:]", "eval", TOK, seq_len=16)
    mid, _ = pipeline.load_examples(f"{path}[2:4]", "train", TOK, seq_len=16)
    assert [TOK.decode(e.ids) for e in train] == [f"r{i}" for i in range(8)]
    assert [TOK.decode(e.ids) for e in held] == ["r8", "r9"]
    assert [TOK.decode(e.ids) for e in mid] == ["r2", "r3"]
    # Errors still name the file and line of the record.
    path.write_text(path.read_text() + "{oops\n")
    with pytest.raises(records.DataError, match=r"all.jsonl:11: malformed JSON"):
        pipeline.load_examples(f"{path}[90%:]", "eval", TOK, seq_len=16)


def _tfds_json_dataset(name: str, data_dir: str, rows: dict[str, list[tuple[str, str]]]):
    """A TFDS dataset of JSON records and their origin, in ArrayRecord files."""
    import tensorflow_datasets as tfds

    class _Builder(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {"record": tfds.features.Text(), "where": tfds.features.Text()}
                ),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(r) for split, r in rows.items()}

        def _generate_examples(self, split_rows):
            for i, (text, where) in enumerate(split_rows):
                yield i, {"record": text, "where": where}

    # tfds looks for metadata next to the builder's module, which must be in a real package.
    builder = type(name, (_Builder,), {"name": name, "__module__": "jaxpost.data.sources"})
    builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_tfds_sources_read_json_records_with_their_origin(tmp_path):
    rows = [(json.dumps({"text": f"t{i}"}), f"orig.jsonl:{i + 1}") for i in range(6)]
    data_dir = str(tmp_path / "tfds")
    _tfds_json_dataset("chat_test", data_dir, {"train": rows[:4], "eval": rows[4:]})
    train, _ = pipeline.load_examples(
        "tfds:chat_test", "train", TOK, seq_len=32, tfds_data_dir=data_dir
    )
    held, _ = pipeline.load_examples(
        "tfds:chat_test", "eval", TOK, seq_len=32, tfds_data_dir=data_dir
    )
    assert [TOK.decode(e.ids) for e in train + held] == [f"t{i}" for i in range(6)]
    first = sources.open_records("tfds:chat_test:eval", "x", tfds_data_dir=data_dir)[1]
    assert first == ({"text": "t5"}, "orig.jsonl:6")
    with pytest.raises(FileNotFoundError, match="Cannot open TFDS dataset 'nope'"):
        sources.open_records("tfds:nope", "train", tfds_data_dir=data_dir)


def test_jsonl_index_finds_every_record_line_across_read_chunks(tmp_path, monkeypatch):
    """Blank and whitespace-only lines are skipped, CRLF and a last line without a newline are
    records, line numbers are the file's; the same with an index read 3 bytes at a time."""
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"a": 1}\n\n  \t \n{"a": 2}\r\n   {"a": "\xc3\xa9"}\n\n{"a": 4}')
    want = [({"a": 1}, 1), ({"a": 2}, 4), ({"a": "\u00e9"}, 5), ({"a": 4}, 7)]
    for chunk in (1 << 20, 3, 1):
        monkeypatch.setattr(sources, "_INDEX_CHUNK", chunk)
        source = sources.JsonlSource(str(path))
        got = [(r, int(w.rsplit(":", 1)[1])) for r, w in source]
        assert got == want, chunk
    assert source[-1] == ({"a": 4}, f"{path}:7")


def test_process_shares_of_a_scan_combine_into_the_single_process_result(tmp_path):
    """Each of n processes validates records i, i+n, ...; combined, their shares give the same
    kept examples, stats and digest as one process, and an invalid record found by another
    process stops every process with its file:line."""
    from jaxpost.data import examples as ex_lib

    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps({"text": "x" * (i % 7 + 1)}) for i in range(23)]
    lines[5] = json.dumps({"nope": 1})
    path.write_text("\n".join(lines) + "\n")
    opened = sources.open_records(str(path), "train")
    handle = pipeline.TokenizerHandle({"tokenizer": "byte"}, TOK)
    settings = pipeline.Settings("sft", 6, "drop")
    one, one_stats = ex_lib.scan_examples(opened, handle, settings, skip_invalid=True)
    for n in (2, 3):
        parts = [
            ex_lib.encode_scan(
                ex_lib.scan(opened, handle, settings, range(i, 23, n), skip_invalid=True), i, n
            )
            for i in range(n)
        ]
        got, stats = ex_lib.scan_examples(
            opened,
            handle,
            settings,
            skip_invalid=True,
            process_index=0,
            process_count=n,
            exchange=lambda mine, parts=parts: [mine, *parts[1:]],
        )
        np.testing.assert_array_equal(got.indices, one.indices)
        assert got.digest == one.digest and stats == one_stats
    # "x" * (i % 7 + 1) plus BOS and EOS exceeds seq_len + 1 = 7 for i % 7 in (5, 6): records
    # 6, 12, 13, 19, 20 (record 5 is the invalid one).
    assert one_stats.skipped == 1 and one_stats.dropped == 5
    assert [len(e.ids) for e in one] == [
        len(e.ids)
        for e in pipeline.load_examples(
            str(path), "train", TOK, seq_len=6, truncation="drop", skip_invalid=True
        )[0]
    ]
    parts = [
        ex_lib.encode_scan(
            ex_lib.scan(opened, handle, settings, range(i, 23, 2), skip_invalid=False), i, 2
        )
        for i in range(2)
    ]
    with pytest.raises(records.DataError, match=r"process 1\) .*mixed.jsonl:6: record matches"):
        ex_lib.scan_examples(
            opened,
            handle,
            settings,
            skip_invalid=False,
            process_index=0,
            process_count=2,
            exchange=lambda mine: [mine, parts[1]],
        )


def test_parquet_rows_are_records(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "prefs.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
                {"prompt": "3+3=", "chosen": "6", "rejected": "6"},
            ]
        ),
        path,
    )
    with pytest.raises(records.DataError, match=r"prefs.parquet\[row 1\]: chosen and rejected"):
        pipeline.load_examples(str(path), "train", TOK, kind="pairs", seq_len=32)
    ex, stats = pipeline.load_examples(
        str(path), "train", TOK, kind="pairs", seq_len=32, skip_invalid=True
    )
    assert len(ex) == 1 and stats.skipped == 1


def test_parquet_is_read_row_group_by_row_group_in_order(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jaxpost.data import sources

    path = tmp_path / "texts.parquet"
    rows = [{"text": f"record {i}"} for i in range(10)]
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    assert pq.ParquetFile(path).num_row_groups == 4
    got = list(sources.read_parquet(str(path)))
    assert [r for r, _ in got] == rows
    assert [w for _, w in got] == [f"{path}[row {i}]" for i in range(10)]
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(records.DataError, match=r"bad.parquet: cannot read as Parquet"):
        list(sources.read_parquet(str(bad)))


def test_array_record_files_are_sources(tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    path = tmp_path / "chat.array_record"
    writer = ArrayRecordWriter(str(path), "group_size:1")
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(5)]
    for row in rows:
        writer.write(json.dumps(row).encode())
    writer.close()
    got = list(sources.read_records(str(tmp_path / "*.array_record"), "train"))
    assert [r for r, _ in got] == rows
    assert got[3][1] == f"{path}[record 3]"
    bad = tmp_path / "bad.array_record"
    writer = ArrayRecordWriter(str(bad), "group_size:1")
    writer.write(b"\xff not json")
    writer.close()
    with pytest.raises(records.DataError, match=r"bad.array_record\[record 0\]: not a UTF-8 JSON"):
        list(sources.read_records(str(bad), "train"))


def test_worker_processes_give_the_same_batches_and_resume():
    """data.num_workers > 0 (grain worker processes, also outside an absl app) yields exactly the
    batches of the in-process pipeline, packed too, and its state restores."""
    examples, _ = pipeline.load_examples("builtin:sort", "train", TOK, seq_len=32)

    def batches(workers, n, state=None):
        it = pipeline.make_train_iterator(
            examples[:400],
            seq_len=32,
            micro_batch=4,
            accum_steps=1,
            seed=3,
            num_workers=workers,
            packing="first_fit",
            segments_per_row=4,
        )
        if state is not None:
            it.set_state(state)
        out = [next(it) for _ in range(n)]
        return out, it.get_state()

    inline, _ = batches(0, 6)
    workers, _ = batches(1, 6)
    for a, b in zip(inline, workers, strict=True):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    _, state = batches(1, 3)
    resumed, _ = batches(1, 3, state)
    for a, b in zip(inline[3:], resumed, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
