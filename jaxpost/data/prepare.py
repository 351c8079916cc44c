"""`jaxpost data prepare`: JSONL/Parquet records -> a TFDS dataset in ArrayRecord files.

The result has random access and starts fast (no parsing of text files at startup beyond the
records themselves), and is read with `tfds.data_source` -- no TensorFlow needed. Each stored
example keeps the record as JSON text plus where it came from (`path:line`), so errors found
later still name the original file and line.

Use it in a config as `data.train_path = "tfds:NAME"` (split `train`) or `"tfds:NAME:eval"`,
with `data.tfds_data_dir` pointing at the `--data_dir` used here.
"""

from __future__ import annotations

import json
import random

from jaxpost.data import sources
from jaxpost.data.records import DataError


def _builder_class(name: str, records: dict[str, list[tuple[str, str]]]):
    import tensorflow_datasets as tfds

    class _JsonRecords(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return self.dataset_info_from_configs(
                features=tfds.features.FeaturesDict(
                    {"record": tfds.features.Text(), "where": tfds.features.Text()}
                ),
                disable_shuffling=True,  # keep file order: record i is line i
            )

        def _split_generators(self, dl_manager):
            return {split: self._generate_examples(rows) for split, rows in records.items()}

        def _generate_examples(self, rows):
            for i, (text, where) in enumerate(rows):
                yield i, {"record": text, "where": where}

    # tfds looks up metadata by the builder's module, which must be a real package.
    return type(name, (_JsonRecords,), {"name": name, "__module__": __name__})


def prepare(
    inputs: list[str], name: str, data_dir: str, *, eval_fraction: float = 0.0, seed: int = 0
) -> dict[str, int]:
    """Validate (as JSON objects) and store every record of `inputs`; returns split sizes.

    With `eval_fraction > 0`, a seeded random fraction of the records goes to split `eval`.
    """
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"--name={name!r}: use a lowercase identifier (letters, digits, _)")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"--eval_fraction={eval_fraction} must be in [0, 1)")
    rows = []
    for spec in inputs:
        for record, where in sources.read_records(spec, "train"):
            if not isinstance(record, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
            rows.append((json.dumps(record, ensure_ascii=False), where))
    if not rows:
        raise ValueError(f"no records in {inputs}")
    splits = {"train": rows}
    if eval_fraction > 0:
        order = list(range(len(rows)))
        random.Random(seed).shuffle(order)
        held = set(order[: max(1, round(eval_fraction * len(rows)))])
        splits = {
            "train": [r for i, r in enumerate(rows) if i not in held],
            "eval": [r for i, r in enumerate(rows) if i in held],
        }
    builder = _builder_class(name, splits)(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return {split: len(r) for split, r in splits.items()}
