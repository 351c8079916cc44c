"""The reference cache key: parameter fingerprints computed shard by shard, never gathered."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxpost import model as model_lib
from jaxpost import reference, sharding


def _sharded(params, mesh_config):
    mesh = sharding.make_mesh(mesh_config)
    model = model_lib.Decoder(model_lib.preset("smoke"))
    with nn.logical_axis_rules(sharding.LOGICAL_RULES):
        boxed = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
        shardings = sharding.logical_shardings(boxed, mesh)["params"]
    return jax.tree.map(jax.device_put, params, shardings)


def test_fingerprints_do_not_depend_on_the_layout_and_see_every_bit():
    params = model_lib.init_params(model_lib.preset("smoke"), seed=0)
    one = reference.params_fingerprint(params)  # one device
    spread = _sharded(params, {"data": 2, "fsdp": 2, "tensor": 2})
    q = spread["layers"]["attn"]["q"]["kernel"]
    assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
    np.testing.assert_array_equal(reference.params_fingerprint(spread), one)
    np.testing.assert_array_equal(
        reference.params_fingerprint(_sharded(params, {"data": 1, "fsdp": 8, "tensor": 1})), one
    )
    # Equal contents, equal fingerprints (the two stacked norm scales start as ones; the key adds
    # each leaf's path); every other leaf its own.
    contents = [np.asarray(x).tobytes() for x in jax.tree.leaves(params)]
    for i in range(len(one)):
        for j in range(i):
            assert (one[i] == one[j]).all() == (contents[i] == contents[j]), (i, j)
    assert len(set(contents)) < len(contents)  # the equal pair exists

    # One ulp in one element, or two elements swapped, changes every lane of that leaf only.
    kernel = np.asarray(params["layers"]["mlp"]["up"]["kernel"])
    bumped = kernel.copy()
    bumped[1, 5, 7] = np.nextafter(bumped[1, 5, 7], np.float32(np.inf))
    swapped = kernel.copy()
    swapped[0, 0, [0, 1]] = swapped[0, 0, [1, 0]]
    leaf = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    index = leaf.index("['layers']['mlp']['up']['kernel']")
    for changed in (bumped, swapped):
        tree = jax.tree.map(lambda x: x, params)
        tree["layers"]["mlp"]["up"]["kernel"] = jnp.asarray(changed)
        fp = reference.params_fingerprint(tree)
        assert (fp[index] != one[index]).all()
        np.testing.assert_array_equal(np.delete(fp, index, 0), np.delete(one, index, 0))

    # bfloat16 params too: a different dtype, a different key.
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    np.testing.assert_array_equal(
        reference.params_fingerprint(_sharded(half, {"data": 2, "fsdp": 2, "tensor": 2})),
        reference.params_fingerprint(half),
    )
    key = reference.cache_key(params, [], seq_len=32)
    assert key == reference.cache_key(spread, [], seq_len=32)
    assert key != reference.cache_key(half, [], seq_len=32)
    assert key != reference.cache_key(params, [], seq_len=64)


def _toy_logps(params, batch):
    """`[1, B, 2]` "log-probs" that depend on each row's tokens (no model to compile)."""
    rows = (batch["inputs"] * batch["loss_mask"]).astype(
        jnp.float32
    )  # [1, B, 2, L]: ids[t] * mask[t+1]
    return rows.sum(-1) * params["scale"]


def test_an_interrupted_reference_pass_resumes_after_its_last_chunk(tmp_path, monkeypatch):
    """Each chunk of batches is saved as it finishes; a pass stopped in the middle continues with
    the chunks not saved, and its result equals an uninterrupted pass, example for example."""
    from jaxpost.data import pipeline
    from jaxpost.data.tokenizer import ByteTokenizer

    examples, _ = pipeline.load_examples(
        "builtin:sort_prefs[:44]", "train", ByteTokenizer(), kind="pairs", seq_len=16
    )
    mesh = sharding.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
    params = {"scale": jnp.float32(0.5)}
    kw = dict(seq_len=16, batch_size=8, mesh=mesh)
    want = reference.compute(_toy_logps, params, examples, **kw)  # 6 batches, the last padded
    hand = [
        [0.5 * float((s.ids[:-1] * s.mask[1:]).sum()) for s in (ex.chosen, ex.rejected)]
        for ex in examples
    ]
    np.testing.assert_array_equal(want, np.asarray(hand, np.float32))

    built = []
    real_batch = pipeline.eval_batch

    def counting(examples, b, **kwargs):
        built.append(b)
        if len(built) == 4:
            raise KeyboardInterrupt  # stopped while building batch 3
        return real_batch(examples, b, **kwargs)

    monkeypatch.setattr(pipeline, "eval_batch", counting)
    parts = str(tmp_path / "parts")
    try:
        reference.compute(_toy_logps, params, examples, parts_dir=parts, **kw)
    except KeyboardInterrupt:
        pass
    assert sorted(p.name for p in (tmp_path / "parts" / "b8-k1").iterdir()) == [
        f"c{c:06d}.npz" for c in range(3)
    ]
    built.clear()

    def recording(examples, b, **kwargs):
        built.append(b)
        return real_batch(examples, b, **kwargs)

    monkeypatch.setattr(pipeline, "eval_batch", recording)
    got = reference.compute(_toy_logps, params, examples, parts_dir=parts, **kw)
    assert built == [3, 4, 5]  # only the chunks not saved before
    np.testing.assert_array_equal(got, want)
    # Another batch size (e.g. lowered after running out of memory) starts its own chunks.
    built.clear()
    got = reference.compute(
        _toy_logps, params, examples, parts_dir=parts, **{**kw, "batch_size": 16}
    )
    assert built == [0, 1, 2]
    np.testing.assert_array_equal(got, want)
