"""Configs and the CLI: every config builds; bad input stops early with a clear message."""

import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, smoke_config

from jaxpost import config as config_lib
from jaxpost import model as model_lib
from jaxpost import train as train_lib
from jaxpost.data.records import DataError
from jaxpost.main import main

CONFIG_FILES = sorted(glob.glob(str(REPO / "configs" / "*.py")))


def test_there_are_config_files():
    assert any(p.endswith("sft.py") for p in CONFIG_FILES)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_and_variant_builds(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "smoke" in module.VARIANTS
    for variant in module.VARIANTS:
        config = config_lib.load_config(path + (f":{variant}" if variant else ""))
        model_lib.Config(**config.model)
        assert config.train.num_steps > 0 and config.checkpoint.every_steps >= 0
    with pytest.raises(ValueError):
        module.get_config("no-such-variant")
    for variant in module.VARIANTS:  # every sweep point is a valid override of its variant
        if hasattr(module, "get_sweep"):
            for point in module.get_sweep(variant):
                config = config_lib.load_config(path + (f":{variant}" if variant else ""))
                config_lib.apply_overrides(config, [f"{k}={v}" for k, v in point.items()])


def test_sweep_expands_points_into_checked_runs(tmp_path):
    from jaxpost import sweep

    points = sweep.expand(f"{REPO}/configs/dpo.py:smoke", str(tmp_path), ["train.num_steps=1"])
    assert [p.name for p in points] == ["loss_type=sigmoid", "loss_type=hinge"]
    assert "--config.train.num_steps=1" in points[0].argv and points[0].num_steps == 1
    assert "--config.objective.loss_type=hinge" in points[1].argv
    assert points[1].workdir == f"{tmp_path}/loss_type=hinge"
    with pytest.raises(ValueError, match="sweep point 0 .*no such config key"):
        sweep.expand(f"{REPO}/configs/dpo.py:smoke", str(tmp_path), ["train.num_step=1"])
    with pytest.raises(ValueError, match="defines no get_sweep"):
        sweep.expand(f"{REPO}/configs/rm.py:smoke", str(tmp_path))


def test_unknown_override_key_suggests_the_right_one():
    config = smoke_config()
    with pytest.raises(
        ValueError,
        match=r"--config.optim.learning_rate: no such config key \(did you "
        r"mean 'optim.lr'\?; optim has: b1, b2",
    ):
        config_lib.apply_overrides(config, ["optim.learning_rate=1e-3"])
    with pytest.raises(ValueError, match="cannot parse as int"):
        config_lib.apply_overrides(config, ["train.num_steps=ten"])
    config_lib.apply_overrides(config, ["optim.lr=1", "log.tensorboard=false", "mesh.data=2"])
    assert config.optim.lr == 1.0 and config.log.tensorboard is False and config.mesh.data == 2


def test_unknown_key_in_a_config_file_is_rejected(tmp_path):
    path = tmp_path / "bad.py"
    path.write_text(
        "from jaxpost import config\n"
        "def get_config(arg=None):\n"
        "    c = config.base_config()\n"
        "    with c.unlocked():\n"
        "        c.optim.learning_rate = 1.0\n"
        "    return c\n"
    )
    with pytest.raises(ValueError, match=r"unknown key 'optim.learning_rate' \(did you mean"):
        config_lib.load_config(str(path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        config_lib.load_config(str(tmp_path / "missing.py"))


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"mesh.data": 3}, ValueError, "does not divide the 8 available devices"),
        ({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 1}, ValueError, "uses 4 of 8 devices"),
        ({"train.global_batch": 12}, ValueError, "not divisible by the data-parallel size"),
        ({"train.global_batch": 16, "train.accum_steps": 3}, ValueError, "not divisible by train"),
        ({"mesh.data": 1, "mesh.tensor": 8, "model.n_heads": 4}, ValueError, "n_heads=4 is not "),
        ({"data.train_path": "/nonexistent/*.jsonl"}, FileNotFoundError, "No data file matches"),
        ({"model.vocab_size": 100}, ValueError, "smaller than the tokenizer"),
        ({"objective.name": "ppo"}, ValueError, "objective.name='ppo'"),
        ({"eval.sample_prompts": "[x"}, ValueError, "sample_prompts is not valid JSON"),
        ({"eval.sample_prompts": '{"a": 1}'}, ValueError, "must be a JSON list of strings"),
        ({"data.tokenizer": "/nonexistent/tok"}, FileNotFoundError, "no such file or directory"),
        ({"init.hf_dir": "/nonexistent/model"}, ValueError, "config.json: missing"),
        ({"init.hf_dir": "builtin:gpt5"}, ValueError, "built-in models are"),
    ],
)
def test_bad_input_stops_before_compiling_and_writes_nothing(tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train_lib.train(smoke_config(**overrides), str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match=rf"{data}:2: malformed JSON"):
        train_lib.train(smoke_config(**{"data.train_path": str(data)}), str(tmp_path / "run"))


def test_cli_writes_config_metrics_and_tensorboard_then_refuses_a_different_model(tmp_path):
    workdir = tmp_path / "run"
    args = [
        "train",
        f"--config={REPO}/configs/sft.py:smoke",
        f"--workdir={workdir}",
        "--config.train.num_steps=4",
        "--config.log.every_steps=2",
        "--config.data.max_eval_examples=16",
    ]
    summary = main(args)
    assert summary["final_step"] == 4
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["train"]["num_steps"] == 4
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4]
    for key in (
        "loss",
        "grad_norm",
        "learning_rate",
        "num_tokens",
        "tokens_per_sec",
        "mfu",
        "seconds_per_step",
    ):
        assert key in train_rows[-1]
    assert any("eval/loss" in r for r in rows)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    with pytest.raises(ValueError, match="holds checkpoints of a different model"):
        main(args + ["--config.model.n_layers=3"])
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before
    assert json.loads((workdir / "config.json").read_text()) == saved


def test_console_command_prints_one_line_errors(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "jaxpost.main",
            "train",
            f"--config={REPO}/configs/sft.py:smoke",
            f"--workdir={tmp_path}",
            "--config.optim.lrr=1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "jaxpost: error: --config.optim.lrr: no such config key" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("name", ["rm", "dpo"])
def test_preference_smoke_configs_run_from_an_empty_workdir(tmp_path, name):
    summary = main(
        [
            "train",
            f"--config={REPO}/configs/{name}.py:smoke",
            f"--workdir={tmp_path}",
            "--config.train.num_steps=2",
            "--config.eval.every_steps=0",
        ]
    )
    assert summary["final_step"] == 2 and "loss" in summary["eval_after"]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    key = "accuracy" if name == "rm" else "rewards/accuracies"
    assert any(key in r for r in rows) and any(f"eval/{key}" in r for r in rows)


def test_resume_refuses_changed_data_settings_but_allows_compute_settings(tmp_path):
    workdir = tmp_path / "run"
    base = [
        "train",
        f"--config={REPO}/configs/sft.py:smoke",
        f"--workdir={workdir}",
        "--config.train.num_steps=2",
        "--config.data.max_eval_examples=16",
    ]
    main(base)
    with pytest.raises(ValueError, match=r"different run \(data.seq_len: 32 there, 48 here"):
        main(base + ["--config.data.seq_len=48"])
    with pytest.raises(ValueError, match=r"train.global_batch: 16 there, 32 here"):
        main(base + ["--config.train.global_batch=32"])
    summary = main(base + ["--config.model.remat=full", "--config.train.num_steps=3"])
    assert summary["start_step"] == 2 and summary["final_step"] == 3


def test_a_run_that_died_before_saving_does_not_lock_its_workdir(tmp_path):
    workdir = tmp_path / "run"
    base = [
        "train",
        f"--config={REPO}/configs/sft.py:smoke",
        f"--workdir={workdir}",
        "--config.train.num_steps=2",
        "--config.data.max_eval_examples=16",
    ]
    with pytest.raises(ValueError, match="packing_bins=0 must be at least 1"):
        main(base + ["--config.data.packing=first_fit", "--config.data.packing_bins=0"])
    (workdir / "checkpoints").mkdir(parents=True, exist_ok=True)  # as orbax leaves it
    (workdir / "config.json").write_text(json.dumps({"train": {"global_batch": 99}}))
    assert main(base)["final_step"] == 2  # no saved step: nothing to protect
    # Memory-only settings may change on resume; packing may not.
    assert (
        main(base + ["--config.objective.logits_chunk_size=8", "--config.train.num_steps=3"])[
            "start_step"
        ]
        == 2
    )
    with pytest.raises(ValueError, match="data.packing: 'none' there, 'first_fit' here"):
        main(base + ["--config.data.packing=first_fit"])


def test_auto_logits_chunk_depends_on_the_backend_and_the_size_of_a_rows_logits():
    from jaxpost import plan

    config = smoke_config(**{"data.seq_len": 2048, "model.vocab_size": 32768})
    assert config.objective.logits_chunk_size == -1  # the default: auto
    # 2048 x 32768 float32 logits = 256 MiB per row > 128 MiB.
    assert plan.resolve_logits_chunk(config, "tpu").objective.logits_chunk_size == 512
    assert plan.resolve_logits_chunk(config, "gpu").objective.logits_chunk_size == 512
    assert plan.resolve_logits_chunk(config, "cpu").objective.logits_chunk_size == 128
    small = smoke_config(**{"data.seq_len": 1024, "model.vocab_size": 32768})  # 128 MiB
    assert plan.resolve_logits_chunk(small, "tpu").objective.logits_chunk_size == 0
    tiny = smoke_config(**{"data.seq_len": 128, "model.vocab_size": 8192})  # 4 MiB
    assert plan.resolve_logits_chunk(tiny, "cpu").objective.logits_chunk_size == 0
    assert plan.resolve_logits_chunk(smoke_config(), "cpu").objective.logits_chunk_size == 0
    fixed = smoke_config(**{"objective.logits_chunk_size": 64})
    assert plan.resolve_logits_chunk(fixed, "tpu").objective.logits_chunk_size == 64


def test_the_cli_asks_glibc_for_huge_pages_once():
    from jaxpost.main import MALLOC_TUNABLE, malloc_env

    glibc = ("glibc", "2.36")
    env = malloc_env({"PATH": "/bin"}, glibc, "linux")
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": MALLOC_TUNABLE, "_JAXPOST_REEXEC": "1"}
    # other tunables are kept; the re-executed process never re-executes, even where glibc
    # dropped the variable (setuid or capability binaries)
    assert malloc_env({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, glibc, "linux")[
        "GLIBC_TUNABLES"
    ] == ("glibc.pthread.rseq=0:" + MALLOC_TUNABLE)
    assert malloc_env(env, glibc, "linux") is None
    assert malloc_env({"_JAXPOST_REEXEC": "1"}, glibc, "linux") is None
    assert malloc_env({"JAXPOST_MALLOC_TUNING": "0"}, glibc, "linux") is None
    assert malloc_env({}, ("glibc", "2.31"), "linux") is None  # no such tunable before 2.35
    assert malloc_env({}, ("", ""), "linux") is None  # musl, or not known
    assert malloc_env({}, glibc, "darwin") is None


def test_the_cli_reexecutes_itself_once_with_the_tunable():
    """Where the tunable applies (glibc >= 2.35 on Linux, as on CI) the CLI runs twice, the
    second time with it; elsewhere it runs once, unchanged."""
    from jaxpost.main import MALLOC_TUNABLE, _libc, malloc_env

    applies = malloc_env({}, _libc()) is not None
    show = "import os; print('tunables', os.environ.get('GLIBC_TUNABLES', '-'), flush=True)"
    code = (
        f"{show}; import sys; sys.argv = ['jaxpost', '--help']; from jaxpost.main import run; run()"
    )
    unset = ("GLIBC_TUNABLES", "_JAXPOST_REEXEC", "JAXPOST_MALLOC_TUNING")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    lines = [x for x in out.stdout.splitlines() if x.startswith("tunables")]
    want = ["tunables -", f"tunables {MALLOC_TUNABLE}"] if applies else ["tunables -"]
    assert lines == want  # at most one re-exec, then the help
    assert "usage: jaxpost" in out.stdout
