"""Per-token statistics of a decoder, from full logits or in vocabulary-sized chunks."""

from __future__ import annotations

from jaxpost import losses
from jaxpost import model as model_lib


def token_stats(
    params,
    model,
    inputs_BL,
    positions_BL,
    segment_ids_BL,
    targets_BL,
    chunk: int,
    mask_BL,
    branch_ids_BL=None,
):
    """`(logps, is_top1, mean_logits)` `[B, L]` for `targets`, valid where `mask` is set (the
    positions a loss reads; elsewhere they may be 0).

    `chunk > 0` runs the output projection only at the masked positions, `chunk` of them at a
    time (`losses.masked_chunked_token_stats`: never the `[B, L, V]` logits, e.g. for 128k
    vocabularies, and no work for prompts and padding); 0 computes the full logits.
    `branch_ids_BL`: shared-prompt pair rows (`model.attention_mask`).
    """
    kw = {} if branch_ids_BL is None else {"branch_ids_BL": branch_ids_BL}
    if chunk > 0:
        hidden_BLD = model.apply(
            {"params": params}, inputs_BL, positions_BL, segment_ids_BL, return_hidden=True, **kw
        )
        unembed_DV = model_lib.unembedding(params, model.config).astype(hidden_BLD.dtype)
        return losses.masked_chunked_token_stats(
            hidden_BLD, unembed_DV, targets_BL, mask_BL > 0, chunk
        )
    logits_BLV = model.apply({"params": params}, inputs_BL, positions_BL, segment_ids_BL, **kw)
    return losses.token_stats(logits_BLV, targets_BL)
