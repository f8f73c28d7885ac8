"""Base models: load each Hugging Face causal LM once and share its frozen weights.

A name resolves to a directory: `tinkerd/tiny` to the built-in model (made on first
use), an existing local path to itself, anything else to a Hugging Face hub id (which
`from_pretrained` fetches on a machine with internet access). Every LoRA run on a base
becomes one named PEFT adapter on that base's single `PeftModel`.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinkerd.engine.tiny import TINY_MODEL_NAME, tiny_model_dir
from tinkerd.engine.tiny_chat import TINY_CHAT_MODEL_NAME, tiny_chat_model_dir

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
    peft_model: nn.Module | None = None
    adapters: set[str] = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)

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
    if name == TINY_MODEL_NAME:
        return tiny_model_dir(cache_dir)
    if name == TINY_CHAT_MODEL_NAME:
        return tiny_chat_model_dir(cache_dir)
    if os.path.isdir(os.path.expanduser(name)):
        return Path(os.path.expanduser(name)).resolve()
    return name  # a hub id


def load_base_model(
    name: str,
    cache_dir: Path | None = None,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    source: str | None = None,
) -> BaseModel:
    """Load `source` (default: `name` itself) and call it `name`."""
    from huggingface_hub.utils import disable_progress_bars
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    disable_progress_bars()
    hf_logging.disable_progress_bar()  # a server log is no place for tqdm bars
    path = resolve_model_path(source or name, cache_dir)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device)
    model.eval()  # no dropout: forward and forward_backward see the same function
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    return BaseModel(
        name=name,
        path=Path(path),
        model=model,
        tokenizer=tokenizer,
        linear_roles=classify_linears(model),
    )


class BaseModelRegistry:
    """Loads each base model once per process; every run on it shares the weights."""

    def __init__(
        self,
        cache_dir: Path | None = None,
        device: str | None = None,
        sources: dict[str, str] | None = None,
    ):
        self.cache_dir = cache_dir
        self.device = device
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
            base = load_base_model(name, self.cache_dir, self.device, source=self.sources.get(name))
            with self._lock:
                self._models[name] = base
            return base

    def loaded(self) -> list[str]:
        with self._lock:
            return list(self._models)
