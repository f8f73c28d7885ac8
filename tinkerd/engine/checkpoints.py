"""Durable LoRA checkpoints: the store (save, list, delete, verify), what a run saves, and
loading it back (format: `tinkerd.engine.checkpoint_format`).

A save is written to a `.tmp-` directory and renamed into place, so a checkpoint is
either complete or absent; `.tmp-` leftovers of a crash are removed on the next start.
"""

from __future__ import annotations

import copy
import io
import json
import os
import re
import secrets
import shutil
import threading
import time
from pathlib import Path

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from tinkerd.engine.adapters import Run, add_frozen_adapter, remove_adapter
from tinkerd.engine.checkpoint_format import (
    CHECKPOINT_TYPES,
    CONFIG_FILE,
    FORMAT_VERSION,
    KINDS,
    META_FILE,
    MODEL_ID_RE,
    OPTIMIZER_FILE,
    SCHEME,
    TMP_PREFIX,
    WEIGHTS_FILE,
    CheckpointInfo,
    CorruptCheckpointError,
    check_names,
    check_part,
    fsync_dir,
    parse_tinker_path,
    read_info,
    read_meta,
    read_verified,
    tinker_path,
    write_file,
)
from tinkerd.engine.lora import adapter_params
from tinkerd.engine.models import BaseModel
from tinkerd.errors import InvalidRequestError, NotFoundError

__all__ = [  # the format's names, re-exported: most callers need only this module
    "CHECKPOINT_TYPES",
    "KINDS",
    "SCHEME",
    "CheckpointInfo",
    "CheckpointStore",
    "CorruptCheckpointError",
    "FORMAT_VERSION",
    "parse_tinker_path",
    "tinker_path",
    "adapter_state_dict",
    "add_adapter_from_checkpoint",
    "export_merged",
    "load_adapter_weights",
    "load_optimizer_state",
]


# ---------------------------------------------------------------- store


class CheckpointStore:
    """Checkpoints under one root directory. Thread-safe; one process per root."""

    def __init__(self, root: Path, recover: bool = True):
        """`recover`: finish or remove what a crash cut off. Only the one process that
        writes to `root` may (other data-parallel ranks only read)."""
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # serialises the renames of save and delete
        for tmp in [] if not recover else sorted(self.root.glob(f"*/*/{TMP_PREFIX}*")):
            # A crash in the middle of an overwrite leaves the old checkpoint aside as
            # trash with nothing in its place: put it back rather than lose it.
            m = re.fullmatch(rf"{re.escape(TMP_PREFIX)}trash-(.+)-[0-9a-f]{{8}}", tmp.name)
            final = tmp.parent / m[1] if m else None
            if final is not None and not final.exists() and read_meta(tmp) is not None:
                os.rename(tmp, final)
            else:
                shutil.rmtree(tmp, ignore_errors=True)

    def _dir(self, model_id: str, kind: str, name: str) -> Path:
        check_names(model_id, kind, name)
        return self.root / model_id / kind / name

    def save(
        self,
        run: Run,
        kind: str,
        name: str,
        *,
        with_optimizer: bool,
        overwrite: bool = False,
        user_metadata: dict[str, str] | None = None,
    ) -> CheckpointInfo:
        """Save the run's adapter (and optimizer state if `with_optimizer`) as `name`, with
        the caller's `user_metadata` (string to string) in its metadata."""
        final = self._dir(run.model_id, kind, name)
        if final.exists() and not overwrite:
            raise _conflict(run.model_id, kind, name)
        with run.base.lock, run.attached():  # one consistent snapshot, copied to CPU
            weights = adapter_state_dict(run)
            optimizer = _optimizer_state(run) if with_optimizer else None
            config = _adapter_config(run)
            step = run.step

        kind_dir = final.parent
        if not kind_dir.exists():
            kind_dir.mkdir(parents=True, exist_ok=True)
            fsync_dir(kind_dir.parent)
            fsync_dir(self.root)
        tmp = kind_dir / f"{TMP_PREFIX}new-{name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        try:
            files = {
                WEIGHTS_FILE: write_file(
                    tmp / WEIGHTS_FILE, safetensors_bytes(weights, metadata={"format": "pt"})
                ),
                CONFIG_FILE: write_file(
                    tmp / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True).encode()
                ),
            }
            if optimizer is not None:
                buffer = io.BytesIO()
                torch.save(optimizer, buffer)
                files[OPTIMIZER_FILE] = write_file(tmp / OPTIMIZER_FILE, buffer.getvalue())
            meta = {
                "format": FORMAT_VERSION,
                "model_id": run.model_id,
                "kind": kind,
                "name": name,
                "base_model": run.base.name,
                "lora": run.lora.model_dump(),
                "optimizer_config": run.optimizer_config.model_dump(),
                "step": step,
                "created_at": time.time(),
                "has_optimizer": optimizer is not None,
                "user_metadata": dict(user_metadata or {}),
                "files": files,
            }
            write_file(tmp / META_FILE, json.dumps(meta, indent=2).encode())
            fsync_dir(tmp)
            with self._lock:
                self._move_into_place(tmp, final, overwrite)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.get(run.model_id, kind, name)

    def _move_into_place(self, tmp: Path, final: Path, overwrite: bool) -> None:
        trash = None
        if final.exists():
            if not overwrite:
                raise _conflict(final.parent.parent.name, final.parent.name, final.name)
            trash = final.parent / f"{TMP_PREFIX}trash-{final.name}-{secrets.token_hex(4)}"
            os.rename(final, trash)
        try:
            os.rename(tmp, final)
        except BaseException:
            if trash is not None:
                os.rename(trash, final)
            raise
        fsync_dir(final.parent)
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)

    def get(self, model_id: str, kind: str, name: str) -> CheckpointInfo:
        path = self._dir(model_id, kind, name)
        info = read_info(path)
        if info is None:
            raise NotFoundError(f"no checkpoint {tinker_path(model_id, kind, name)}")
        return info

    def resolve(self, tinker_path: str) -> CheckpointInfo:
        return self.get(*parse_tinker_path(tinker_path))

    def list(self, model_id: str | None = None) -> list[CheckpointInfo]:
        """Complete checkpoints (of one run, or all), oldest first."""
        if model_id is not None:
            check_part("model_id", model_id, MODEL_ID_RE)
        paths = self.root.glob(f"{model_id or '*'}/*/*")
        infos = [info for info in map(read_info, paths) if info is not None]
        return sorted(infos, key=lambda i: (i.created_at, i.tinker_path))

    def delete(self, model_id: str, kind: str, name: str) -> None:
        """Remove a checkpoint (atomically: it is renamed away before its files go)."""
        path = self._dir(model_id, kind, name)
        trash = path.parent / f"{TMP_PREFIX}deleted-{name}-{secrets.token_hex(4)}"
        with self._lock:
            if not path.is_dir():
                raise NotFoundError(f"no checkpoint {tinker_path(model_id, kind, name)}")
            os.rename(path, trash)
            fsync_dir(path.parent)
        shutil.rmtree(trash, ignore_errors=True)

    def verify(self, info: CheckpointInfo) -> None:
        """Recompute the sha256 of every file; raise CorruptCheckpointError on a mismatch."""
        meta = read_meta(info.path)
        if meta is None:
            raise NotFoundError(f"no checkpoint {info.tinker_path}")
        for filename in meta["files"]:
            read_verified(info.path, filename)


def _conflict(model_id: str, kind: str, name: str) -> InvalidRequestError:
    return InvalidRequestError(
        f"checkpoint {tinker_path(model_id, kind, name)} already exists; "
        "pass overwrite=True to replace it"
    )


# ---------------------------------------------------------------- what is saved


def _peft_state_dict(base: BaseModel, adapter_name: str) -> dict[str, Tensor]:
    """Adapter tensors under PEFT's saved names (live views, not copies)."""
    from peft import get_peft_model_state_dict

    # PEFT's default ("auto") would add the *frozen base* lm_head / embedding matrices
    # whenever lm_head is a LoRA target; they are part of the base, not the adapter.
    return get_peft_model_state_dict(
        base.peft_model, adapter_name=adapter_name, save_embedding_layers=False
    )


def adapter_state_dict(run: Run) -> dict[str, Tensor]:
    """The run's LoRA weights as CPU float32 copies, keyed as PEFT saves them: e.g.
    `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` `[rank, in_features]`
    and `...lora_B.weight` `[out_features, rank]` (no adapter name in the keys)."""
    with run.base.lock:
        state = _peft_state_dict(run.base, run.model_id)
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


def _param_names(run: Run) -> list[str]:
    """Saved name (as in `adapter_state_dict`) of each of `run.params`, in order."""
    names = {id(p): n for n, p in adapter_params(run.base.peft_model, run.model_id).items()}
    out = []
    for p in run.params:  # `...q_proj.lora_A.<model_id>.weight` -> `...q_proj.lora_A.weight`
        head, _, tail = names[id(p)].rpartition(f".{run.model_id}.")
        out.append(f"{head}.{tail}")
    return out


def _optimizer_state(run: Run) -> dict:
    """CPU copy of the optimizer's state by saved parameter name, plus `run_step`."""
    names = _param_names(run)
    if run.optimizer_config.type == "dimuon":
        state = run.optimizer.state_dict()
        momentum = {names[i]: m.detach().to("cpu", copy=True) for i, m in state["momentum"].items()}
        return {**state, "momentum": momentum, "run_step": run.step}
    state: dict = {"run_step": run.step}
    for name, p in zip(names, run.params):
        if p in run.optimizer.state:  # a parameter that never had a gradient has no state
            state[name] = {
                k: v.detach().to("cpu", copy=True) for k, v in run.optimizer.state[p].items()
            }
    return state


def _adapter_config(run: Run) -> dict:
    """adapter_config.json as PEFT's `save_pretrained` writes it."""
    config = copy.deepcopy(run.base.peft_model.peft_config[run.model_id])
    config.base_model_name_or_path = str(run.base.path)
    config.inference_mode = True
    out = {k: sorted(v) if isinstance(v, set) else v for k, v in config.to_dict().items()}
    if config.task_type is None:  # PEFT records the base class for AutoPeftModel
        cls = type(run.base.peft_model.base_model.model)
        out["auto_mapping"] = {"base_model_class": cls.__name__, "parent_library": cls.__module__}
    return out


# ---------------------------------------------------------------- loading


def load_adapter_weights(base: BaseModel, adapter_name: str, info: CheckpointInfo) -> None:
    """Copy a checkpoint's LoRA weights into the existing adapter `adapter_name` of `base`,
    which must have the same rank, alpha and target modules."""
    from peft import set_peft_model_state_dict

    if info.base_model != base.name:
        raise InvalidRequestError(
            f"checkpoint {info.tinker_path} is of base model {info.base_model!r}, not {base.name!r}"
        )
    if base.peft_model is None or adapter_name not in base.peft_model.peft_config:
        raise NotFoundError(f"base model {base.name!r} has no adapter {adapter_name!r}")
    weights = safetensors_load(read_verified(info.path, WEIGHTS_FILE))
    saved_config = json.loads(read_verified(info.path, CONFIG_FILE))
    with base.lock:
        config = base.peft_model.peft_config[adapter_name]
        for key in ("lora_alpha", "use_rslora", "use_dora"):
            if saved_config.get(key) != getattr(config, key):
                raise InvalidRequestError(
                    f"checkpoint {info.tinker_path} has {key}={saved_config.get(key)}, "
                    f"adapter {adapter_name!r} has {getattr(config, key)}"
                )
        expected = {k: v.shape for k, v in _peft_state_dict(base, adapter_name).items()}
        got = {k: v.shape for k, v in weights.items()}
        if got != expected:
            raise InvalidRequestError(
                f"checkpoint {info.tinker_path} (rank {info.lora_rank}) does not fit adapter "
                f"{adapter_name!r}: {_diff(got, expected)}"
            )
        result = set_peft_model_state_dict(base.peft_model, weights, adapter_name=adapter_name)
        if result.unexpected_keys:  # cannot happen after the check above, but never silently
            raise InvalidRequestError(f"unexpected adapter keys {result.unexpected_keys[:3]}")


def add_adapter_from_checkpoint(base: BaseModel, adapter_name: str, info: CheckpointInfo) -> None:
    """Load a checkpoint as a new inference-only adapter `adapter_name` of `base`."""
    from peft import LoraConfig

    read_verified(info.path, CONFIG_FILE)
    config = LoraConfig.from_pretrained(str(info.path))
    config.inference_mode = True
    add_frozen_adapter(base, adapter_name, config, {})
    try:
        load_adapter_weights(base, adapter_name, info)
    except BaseException:
        remove_adapter(base, adapter_name)
        raise
    with base.lock:
        for p in adapter_params(base.peft_model, adapter_name).values():
            p.requires_grad_(False)


def _diff(got: dict, expected: dict) -> str:
    missing = sorted(expected.keys() - got.keys())
    extra = sorted(got.keys() - expected.keys())
    shapes = [
        f"{k}: {tuple(got[k])} vs {tuple(expected[k])}"
        for k in sorted(got.keys() & expected.keys())
        if got[k] != expected[k]
    ]
    parts = [
        f"{label} {items[:3]}{' ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", extra), ("shape", shapes))
        if items
    ]
    return "; ".join(parts)


def load_optimizer_state(run: Run, info: CheckpointInfo) -> None:
    """Restore the optimizer's state (AdamW's exp_avg, exp_avg_sq and step of every
    parameter, or Dimuon's momentum) and `run.step`. The run's optimizer must be the
    checkpoint's (`Engine.load_state` checks).

    Parameters are matched by saved name (adapter name stripped), so a checkpoint of
    run A loads into a run B created with the same LoraConfig."""
    if not info.has_optimizer:
        raise InvalidRequestError(f"checkpoint {info.tinker_path} has no optimizer state")
    data = read_verified(info.path, OPTIMIZER_FILE)
    saved = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    run_step = saved.pop("run_step")
    kind = saved.get("type", "adamw")  # AdamW's files have no type
    if kind != run.optimizer_config.type:
        raise InvalidRequestError(
            f"optimizer state of {info.tinker_path} is {kind!r}; run {run.model_id!r} "
            f"uses {run.optimizer_config.type!r}"
        )
    with run.base.lock:
        names = _param_names(run)
        shapes = {n: p.shape for n, p in zip(names, run.params)}
        tensors = (
            saved["momentum"] if kind == "dimuon" else {n: s["exp_avg"] for n, s in saved.items()}
        )
        got = {n: t.shape for n, t in tensors.items()}
        want = {n: shapes[n] for n in got if n in shapes}
        if got != want:  # a parameter without state (never had a gradient) is fine
            raise InvalidRequestError(
                f"optimizer state of {info.tinker_path} does not fit run {run.model_id!r}: "
                f"{_diff(got, want)}"
            )
        if kind == "dimuon":  # Dimuon keeps its state by position in run.params
            momentum = {i: saved["momentum"][n] for i, n in enumerate(names) if n in got}
            run.optimizer.load_state_dict({**saved, "momentum": momentum})
        else:
            # Optimizer.load_state_dict casts each state to its parameter's device and dtype
            # (keeping `step` as AdamW wants it); params are indexed in run.params order.
            adam = run.optimizer.torch
            state_dict = adam.state_dict()
            state_dict["state"] = {i: saved[n] for i, n in enumerate(names) if n in saved}
            adam.load_state_dict(state_dict)
            run.optimizer.steps = int(run_step)
        run.step = int(run_step)


# ---------------------------------------------------------------- export


def export_merged(base_model_dir: Path | str, info: CheckpointInfo, out_dir: Path) -> None:
    """Write base + LoRA merged into plain weights (float32), with the base's tokenizer,
    as a Hugging Face model directory that `AutoModelForCausalLM.from_pretrained` loads
    (`AutoModelForImageTextToText` for a vision-language model, whose image processor
    is written too: its vision tower is the base's, untouched)."""
    from peft import PeftModel

    from tinkerd.engine.vision import auto_model_class

    for filename in (WEIGHTS_FILE, CONFIG_FILE):
        read_verified(info.path, filename)
    model = auto_model_class(base_model_dir).from_pretrained(base_model_dir, dtype=torch.float32)
    if info.train_unembed:
        # A tied lm_head: merging its LoRA into the shared matrix would change the input
        # embeddings too, which the adapter never does.
        untie_head(model)
    merged = PeftModel.from_pretrained(model, str(info.path)).merge_and_unload()
    _save_with_processors(merged, base_model_dir, out_dir)


def export_untied_base(base_model_dir: Path | str, out_dir: Path) -> bool:
    """Write a checkpoint's base model (float32, with its tokenizer) with `lm_head` untied
    from the input embeddings: its own copy of the matrix and `tie_word_embeddings=False`.

    Why: a run with `train_unembed=True` on a tied base (SmolLM2) adapts `lm_head` alone,
    and PEFT wraps that module. Tools that call `model.tie_weights()` after
    `PeftModel.from_pretrained` (lm-eval's `hf --peft`) then fail with "attribute 'weight'
    already exists", whatever form the adapter takes (a LoRA on `lm_head`,
    `ensure_weight_tying`, `modules_to_save`, `target_parameters`: all wrap it).
    On this untied base `tie_weights()` ties nothing and the adapter loads unchanged,
    giving the run's logits. Returns whether the base was tied (else it is written as is)."""
    from tinkerd.engine.vision import auto_model_class

    model = auto_model_class(base_model_dir).from_pretrained(base_model_dir, dtype=torch.float32)
    tied = untie_head(model)
    _save_with_processors(model, base_model_dir, out_dir)
    return tied


def untie_head(model: torch.nn.Module) -> bool:
    """Give a tied `lm_head` its own copy of the embedding matrix and record it in the
    config; returns whether it was tied."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is not embed.weight:
        return False
    head.weight = torch.nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.config.get_text_config().tie_word_embeddings = False
    return True


def _save_with_processors(
    model: torch.nn.Module, base_model_dir: Path | str, out_dir: Path
) -> None:
    """Save `model` and the base's tokenizer (and image processor for a vision-language
    model) as a Hugging Face model directory."""
    from transformers import AutoTokenizer

    from tinkerd.engine.vision import is_vision_config

    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(base_model_dir).save_pretrained(out_dir)
    if is_vision_config(model.config):
        from transformers import AutoImageProcessor

        AutoImageProcessor.from_pretrained(base_model_dir, backend="pil").save_pretrained(out_dir)
