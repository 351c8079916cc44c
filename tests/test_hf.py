"""Hugging Face checkpoints: jaxpost's logits equal transformers' (fixtures by
tools/make_hf_fixtures.py), sharded loading, lossless export round trip, clear errors."""

import json
import os
import pathlib
import shutil
import struct

import jax
import numpy as np
import pytest

from jaxpost import hf, safetensors_io, sharding
from jaxpost import model as model_lib

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "hf"
CAUSAL = ["llama", "llama3_tied", "mistral", "qwen2_bf16", "qwen3"]


def _expected(name):
    return np.load(FIXTURES / name / "expected.npz")


def _close(got, want):
    # float32 throughout on both sides; differences come from summation order over
    # D=32-wide dot products through two layers: a few ulps of the logit scale.
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("name", CAUSAL)
def test_logits_match_transformers(name):
    config, params = hf.load_pretrained(str(FIXTURES / name))
    expected = _expected(name)
    logits = np.asarray(hf.logits(config, params, expected["input_ids"]))
    assert logits.shape == expected["logits"].shape
    _close(logits, expected["logits"])


def test_architecture_features_are_read_from_config():
    features = {name: hf.read_config(str(FIXTURES / name))[0] for name in CAUSAL}
    assert features["llama3_tied"].rope_scaling == "llama3"
    assert features["llama3_tied"].tie_embeddings and features["qwen2_bf16"].tie_embeddings
    assert features["mistral"].sliding_window == 4
    assert features["qwen2_bf16"].qkv_bias and features["qwen2_bf16"].rope_theta == 1e6
    assert features["qwen3"].qk_norm
    assert not features["llama"].tie_embeddings
    # Every feature matters: switching it off changes the logits.
    expected = _expected("llama3_tied")
    config, params = hf.load_pretrained(str(FIXTURES / "llama3_tied"))
    import dataclasses

    plain = dataclasses.replace(config, rope_scaling="")
    off = np.asarray(hf.logits(plain, params, expected["input_ids"]))
    assert np.abs(off - expected["logits"]).max() > 1e-3


def test_reward_model_scores_match_transformers():
    config, params = hf.load_pretrained(str(FIXTURES / "llama_rm"))
    assert set(params) == {"decoder", "score"}
    expected = _expected("llama_rm")
    ids = expected["input_ids"]
    rewards = model_lib.RewardModel(config).apply({"params": params}, ids)
    seg = np.ones_like(ids)
    scores = np.asarray(model_lib.last_token_values(rewards, seg))
    _close(scores, expected["scores"])


def test_sharded_loading_gives_each_device_its_slice():
    config, kind = hf.read_config(str(FIXTURES / "llama"))
    mesh = sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})
    import flax.linen as nn
    import jax.numpy as jnp

    boxed = jax.eval_shape(
        model_lib.Decoder(config).init, jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32)
    )
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        shardings = sharding.logical_shardings(boxed, mesh)["params"]
    shapes = sharding.strip_boxes(boxed)["params"]
    target = jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, np.float32, sharding=sh), shapes, shardings
    )
    params = hf.load_params(str(FIXTURES / "llama"), config, kind, target=target)
    reference = hf.load_params(str(FIXTURES / "llama"), config, kind)
    for got, want, sh in zip(
        jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(shardings), strict=True
    ):
        assert got.sharding == sh
        np.testing.assert_array_equal(np.asarray(got), want)
    q = params["layers"]["attn"]["q"]["kernel"]
    assert not q.sharding.is_fully_replicated
    assert q.addressable_shards[0].data.size < q.size  # no device holds the whole tensor


@pytest.mark.parametrize("name", CAUSAL + ["llama_rm"])
def test_export_round_trip_is_lossless(tmp_path, name):
    config, params = hf.load_pretrained(str(FIXTURES / name))
    out = hf.save_pretrained(str(tmp_path / name), config, params, max_shard_bytes=20_000)
    config2, params2 = hf.load_pretrained(out)
    assert config2 == config
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(a, b)
    files = os.listdir(out)
    assert "model.safetensors.index.json" in files and "config.json" in files
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".jaxpost-")]


def test_exported_files_are_standard_safetensors(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    config, params = hf.load_pretrained(str(FIXTURES / "qwen3"))
    original = hf.Tensors(str(FIXTURES / "qwen3"))
    out = hf.save_pretrained(str(tmp_path / "q"), config, params)
    tensors = safetensors_numpy.load_file(os.path.join(out, "model.safetensors"))
    assert set(tensors) == set(original.names())
    for name, value in tensors.items():
        np.testing.assert_array_equal(value, np.asarray(original.get(name)))
    # Sharded: every file standard, the index naming each tensor's file.
    out = hf.save_pretrained(str(tmp_path / "s"), config, params, max_shard_bytes=20_000)
    index = json.loads((pathlib.Path(out) / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    sizes = 0
    for file in files:
        for name, value in safetensors_numpy.load_file(os.path.join(out, file)).items():
            assert index["weight_map"][name] == file
            np.testing.assert_array_equal(value, np.asarray(original.get(name)))
            sizes += value.nbytes
    assert index["metadata"]["total_size"] == sizes
    assert len(index["weight_map"]) == len(original.names())


def test_streaming_writer_checks_order_and_writes_views_in_chunks(tmp_path):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    import ml_dtypes

    a = np.arange(40 * 24, dtype=np.float32).reshape(40, 24)
    b = np.arange(7, dtype=np.float32).astype(ml_dtypes.bfloat16)
    specs = [
        safetensors_io.Spec("a", np.dtype(np.float32), (24, 40)),
        safetensors_io.Spec("b", b.dtype, (7,)),
    ]
    path = str(tmp_path / "x.safetensors")
    # A transposed view written 3 rows (3 x 40 x 4 bytes) at a time.
    with safetensors_io.SafetensorsWriter(path, specs, chunk_bytes=500) as writer:
        with pytest.raises(ValueError, match="expected 'a' float32\\[24, 40\\] next"):
            writer.write("a", a)
        writer.write("a", a.T)
        writer.write("b", b)
    got = safetensors_numpy.load_file(path)
    np.testing.assert_array_equal(got["a"], a.T)
    np.testing.assert_array_equal(got["b"], b)
    with pytest.raises(ValueError, match="1 tensors never written, e.g. b"):
        with safetensors_io.SafetensorsWriter(path, specs) as writer:
            writer.write("a", a.T)


def test_bfloat16_export_and_config_fields(tmp_path):
    config, params = hf.load_pretrained(str(FIXTURES / "qwen2_bf16"))
    out = hf.save_pretrained(str(tmp_path / "b"), config, params, dtype="bfloat16")
    with open(os.path.join(out, "model.safetensors"), "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    hf_config = json.loads((pathlib.Path(out) / "config.json").read_text())
    assert hf_config["architectures"] == ["Qwen2ForCausalLM"]
    assert hf_config["torch_dtype"] == "bfloat16" and hf_config["tie_word_embeddings"]
    # The stored values were bf16 to begin with: exporting them in bf16 loses nothing.
    _, params2 = hf.load_pretrained(out)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params2), strict=True):
        np.testing.assert_array_equal(a, b)


def _copy(name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    return dst


def test_bad_checkpoints_name_the_problem(tmp_path):
    d = _copy("llama", tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(hf.HFError, match=r"architectures=\['GPT2LMHeadModel'\] is not supported"):
        hf.read_config(str(d))
    qwen = {**cfg, "architectures": ["Qwen2ForCausalLM"], "use_sliding_window": True}
    (d / "config.json").write_text(json.dumps(qwen))
    with pytest.raises(hf.HFError, match="use_sliding_window=true"):
        hf.read_config(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "hidden_act": "gelu"}))
    with pytest.raises(hf.HFError, match="hidden_act='gelu'"):
        hf.read_config(str(d))
    bad = {k: v for k, v in cfg.items() if k != "intermediate_size"}
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(hf.HFError, match="config.json: missing field 'intermediate_size'"):
        hf.read_config(str(d))
    (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(hf.HFError, match=r"mlp.gate_proj.weight' has shape \[64, 32\]"):
        hf.load_pretrained(str(d))
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(hf.HFError, match="shard 'model-00002-of-00003.safetensors'.*missing"):
        hf.load_pretrained(str(d))
    (d / "model.safetensors.index.json").unlink()
    with pytest.raises(hf.HFError, match="no model.safetensors"):
        hf.load_pretrained(str(d))


def test_unknown_dtype_and_missing_tensor(tmp_path):
    d = _copy("qwen3", tmp_path)
    path = d / "model.safetensors"
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header["model.norm.weight"]["dtype"] = "Q7"
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (n - len(blob)) if len(blob) <= n else b""
    assert len(blob) == n
    path.write_bytes(raw[:8] + blob + raw[8 + n :])
    with pytest.raises(hf.HFError, match="'model.norm.weight' has unknown dtype 'Q7'"):
        hf.load_pretrained(str(d))
    del header["model.norm.weight"]
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    hf.write_safetensors(
        str(path), {k: np.zeros(v["shape"], np.float32) for k, v in tensors.items()}
    )
    with pytest.raises(hf.HFError, match="tensor 'model.norm.weight' is missing"):
        hf.load_pretrained(str(d))


def test_export_refuses_to_overwrite_and_leaves_nothing_partial(tmp_path, monkeypatch):
    config, params = hf.load_pretrained(str(FIXTURES / "llama"))
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        hf.save_pretrained(str(occupied), config, params)
    assert os.listdir(occupied) == ["keep.txt"]
    bad = jax.tree.map(lambda x: x, params)
    bad["lm_head"] = bad["lm_head"][:, :10]
    with pytest.raises(ValueError, match="lm_head has shape"):
        hf.save_pretrained(str(tmp_path / "x"), config, bad)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors_io.SafetensorsWriter, "write", broken)
    with pytest.raises(OSError, match="disk full"):
        hf.save_pretrained(str(tmp_path / "y"), config, params)
    assert sorted(os.listdir(tmp_path)) == ["occupied"]


# --- training from a Hugging Face directory ------------------------------------------------


def _train_cfg(name, **overrides):
    from jaxpost import config as config_lib

    repo = pathlib.Path(__file__).resolve().parents[1]
    config = config_lib.load_config(f"{repo}/configs/{name}.py:smoke")
    config_lib.apply_overrides(config, [f"{k}={v}" for k, v in overrides.items()])
    return config


def test_sft_starts_from_a_hugging_face_directory(tmp_path):
    from jaxpost import checkpoint
    from jaxpost import train as train_lib

    src = FIXTURES / "llama"
    config = _train_cfg(
        "sft",
        **{
            "init.hf_dir": str(src),
            "data.tokenizer": "byte",
            "optim.lr": 0.0,
            "train.num_steps": 1,
        },
    )
    train_lib.train(config, str(tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    hf_config, _ = hf.read_config(str(src))
    assert saved["model"]["n_kv_heads"] == hf_config.n_kv_heads == 2
    assert saved["model"]["vocab_size"] == 272 and not saved["model"]["tie_embeddings"]
    # With lr=0 the checkpoint holds exactly the imported weights.
    _, want = hf.load_pretrained(str(src))
    got = checkpoint.load_params(str(tmp_path / "run"))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(a, b)


def test_rm_and_dpo_start_from_a_hugging_face_directory(tmp_path):
    from jaxpost import train as train_lib

    src = str(FIXTURES / "qwen3")
    rm = train_lib.train(
        _train_cfg("rm", **{"init.hf_dir": src, "data.tokenizer": "byte", "train.num_steps": 2}),
        str(tmp_path / "rm"),
    )
    assert np.isfinite(rm["eval_after"]["loss"])
    dpo = _train_cfg(
        "dpo",
        **{"init.hf_dir": src, "data.tokenizer": "byte", "train.num_steps": 1, "optim.lr": 0.0},
    )
    summary = train_lib.train(dpo, str(tmp_path / "dpo"))
    # Policy = reference at the start: the DPO loss is log 2.
    assert summary["eval_before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    with pytest.raises(ValueError, match="is a reward model"):
        train_lib.train(
            _train_cfg("sft", **{"init.hf_dir": str(FIXTURES / "llama_rm")}), str(tmp_path / "x")
        )
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json"):
        train_lib.train(_train_cfg("sft", **{"init.hf_dir": src}), str(tmp_path / "y"))


def test_gguf_row_permutation_is_inverted(tmp_path):
    from jaxpost import convert

    w = np.arange(6 * 8 * 3, dtype=np.float32).reshape(6 * 8, 3)  # 6 heads of Dh=8
    permuted = convert.permute_rows(w, 6)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(convert.unpermute_rows(permuted, 6), w)
    # llama.cpp interleaves the two rotary halves of each head: rows 0..3 and 4..7 of head 0
    # become rows 0, 2, 4, 6 and 1, 3, 5, 7.
    np.testing.assert_array_equal(permuted[[0, 2, 4, 6], 0], w[[0, 1, 2, 3], 0])
    np.testing.assert_array_equal(permuted[[1, 3, 5, 7], 0], w[[4, 5, 6, 7], 0])
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        convert.convert(str(tmp_path / "missing.gguf"), str(tmp_path / "out"))
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(convert.GGUFError, match="not a readable GGUF file"):
        convert.convert(str(bad), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("block_rows", [3, 20, 1000])
def test_gguf_tensors_dequantise_in_blocks_of_whole_heads(monkeypatch, block_rows):
    import types

    import gguf

    from jaxpost import convert

    q8 = gguf.GGMLQuantizationType.Q8_0
    w = np.random.default_rng(0).normal(size=(6 * 8, 64)).astype(np.float32)  # 6 heads, Dh=8
    stored = gguf.quants.quantize(convert.permute_rows(w, 6), q8)  # as llama.cpp stores q
    t = types.SimpleNamespace(name="blk.0.attn_q.weight", data=stored, tensor_type=q8)
    # Blocks of 3 or 20 rows round down to whole heads (8 or 16 rows); 1000 is one block.
    monkeypatch.setattr(convert, "_BLOCK_BYTES", block_rows * 64 * 4)
    got = convert._dequantize(gguf, t, (48, 64), 6, "x.gguf")
    want = convert.unpermute_rows(gguf.quants.dequantize(stored, q8), 6)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got, w, atol=0.02)  # Q8_0's rounding, nothing else


def test_export_edge_cases(tmp_path):
    import dataclasses

    # A reward model's pad must not be its EOS (transformers scores the last non-pad token).
    assert hf.reward_pad_id({"eos_token_id": 2, "pad_token_id": 2, "unk_token_id": 0}) == 0
    assert hf.reward_pad_id({"eos_token_id": 2, "pad_token_id": 2, "bos_token_id": 1}) == 1
    assert hf.reward_pad_id({"eos_token_id": [2, 7], "pad_token_id": 5}) == 5
    config, params = hf.load_pretrained(str(FIXTURES / "llama3_tied"))
    assert config.max_position_embeddings == 256
    out = hf.save_pretrained(str(tmp_path / "m"), config, params)
    assert (
        json.loads((pathlib.Path(out) / "config.json").read_text())["max_position_embeddings"]
        == 256
    )
    with pytest.raises(ValueError, match="no Hugging Face architecture"):
        hf.config_to_hf(dataclasses.replace(config, qk_norm=True, qkv_bias=True))
    # Scalars and a Mistral config without sliding_window (transformers' default is 4096).
    hf.write_safetensors(str(tmp_path / "s.safetensors"), {"s": np.array(3.5, np.float32)})
    assert float(safetensors_io.SafetensorsFile(str(tmp_path / "s.safetensors")).get("s")) == 3.5
    cfg = json.loads((FIXTURES / "mistral" / "config.json").read_text())
    del cfg["sliding_window"]
    assert hf.config_from_hf(cfg)[0].sliding_window == 4096
