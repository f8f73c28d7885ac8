"""The on-disk format of a checkpoint: layout, names and paths, metadata, verification.

Layout: `root/<model_id>/<kind>/<name>/` holds
- `adapter_model.safetensors` + `adapter_config.json`, exactly as PEFT's `save_pretrained`
  writes them, so `PeftModel.from_pretrained(base, dir)` loads the directory as-is;
- `optimizer.pt` (only if saved with the optimizer), keyed by the same parameter names as
  the adapter weights, plus `run_step`: of AdamW, per parameter `exp_avg`, `exp_avg_sq`,
  `step`; of Dimuon, `type` "dimuon", `version`, `rank`, `step` and `momentum` (per
  parameter, float32). A file without `type` is AdamW's;
- `tinkerd.json`, written last: what was saved (with the run's `optimizer_config`; none
  means AdamW, as before it was recorded), and the sha256 and size of every file.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from tinkerd.errors import InvalidRequestError, NotFoundError, TinkerdError
from tinkerd.paths import (  # noqa: F401  re-exported for the engine's modules
    KINDS,
    MODEL_ID_RE,
    SCHEME,
    check_names,
    check_part,
    parse_tinker_path,
    tinker_path,
)
from tinkerd.types import (
    AdamOptimizerConfig,
    AnyOptimizerConfig,
    Checkpoint,
    WeightsInfoResponse,
    optimizer_config_from,
)

CHECKPOINT_TYPES = {
    "weights": "training",
    "sampler_weights": "sampler",
    "external_weights": "external",
}
"""The SDK's `Checkpoint.checkpoint_type` of each kind."""
FORMAT_VERSION = 1
META_FILE = "tinkerd.json"
WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
OPTIMIZER_FILE = "optimizer.pt"
TMP_PREFIX = ".tmp-"


class CorruptCheckpointError(TinkerdError):
    """A checkpoint's files no longer match the checksums recorded when it was saved."""


@dataclass
class CheckpointInfo:
    model_id: str
    kind: str
    name: str
    path: Path
    """The checkpoint's directory."""
    tinker_path: str
    base_model: str
    lora_rank: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    step: int
    """Optimizer steps the run had taken when saved."""
    has_optimizer: bool
    created_at: float
    """Unix time in seconds."""
    size_bytes: int
    """All files of the checkpoint together, tinkerd.json included."""
    optimizer_config: AnyOptimizerConfig = field(default_factory=AdamOptimizerConfig)
    """The optimizer of the run that saved it (whose state `optimizer.pt` holds)."""
    user_metadata: dict[str, str] = field(default_factory=dict)
    """Given with the save; an overwrite replaces it."""
    identity: str = ""
    """What the checkpoint holds: the sha256 of its weights and adapter config. The same
    path re-saved (overwrite, or delete and save) with other weights has another one."""

    def as_checkpoint(self, public: bool = False) -> Checkpoint:
        """The SDK's view of this checkpoint (what the REST API lists)."""
        return Checkpoint(
            checkpoint_id=f"{self.kind}/{self.name}",
            checkpoint_type=CHECKPOINT_TYPES[self.kind],
            time=datetime.datetime.fromtimestamp(self.created_at, datetime.timezone.utc),
            tinker_path=self.tinker_path,
            size_bytes=self.size_bytes,
            public=public,
            user_metadata=self.user_metadata,
        )

    def weights_info(self) -> WeightsInfoResponse:
        return WeightsInfoResponse(
            base_model=self.base_model,
            is_lora=True,
            lora_rank=self.lora_rank,
            train_unembed=self.train_unembed,
            train_mlp=self.train_mlp,
            train_attn=self.train_attn,
            optimizer_config=self.optimizer_config,
        )


# ---------------------------------------------------------------- file helpers


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Path, data: bytes) -> dict:
    """Write `data` durably; returns its {"sha256", "size"} entry for the metadata."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def read_meta(path: Path) -> dict | None:
    """The checkpoint metadata in directory `path`, or None if it is not a complete one."""
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    keys = ("model_id", "kind", "name", "base_model", "lora", "step", "created_at", "files")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        return None
    return meta if all(k in meta for k in keys) else None


def read_verified(path: Path, filename: str) -> bytes:
    """The bytes of one checkpoint file, checked against the metadata's sha256 and size."""
    meta = read_meta(path)
    if meta is None:
        raise NotFoundError(f"no complete checkpoint at {path}")
    entry = meta["files"].get(filename)
    if entry is None:
        raise CorruptCheckpointError(f"checkpoint {path} has no {filename} in its metadata")
    try:
        data = (path / filename).read_bytes()
    except OSError as e:
        raise CorruptCheckpointError(f"checkpoint {path}: cannot read {filename}: {e}") from None
    if len(data) != entry["size"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
        raise CorruptCheckpointError(
            f"checkpoint {path}: {filename} does not match its recorded sha256 and size "
            f"({entry['size']} bytes); the file is corrupted"
        )
    return data


def read_info(path: Path) -> CheckpointInfo | None:
    """The checkpoint in directory `path`, or None if it is not a complete, valid one."""
    meta = read_meta(path)
    if meta is None:
        return None
    try:
        return _info(path, meta)
    except (InvalidRequestError, KeyError, TypeError, AttributeError, OSError):
        return None  # a temp dir, a stray directory, or hand-edited metadata


def _info(path: Path, meta: dict) -> CheckpointInfo:
    model_id, kind, name = path.parent.parent.name, path.parent.name, path.name
    lora = meta["lora"]
    return CheckpointInfo(
        model_id=model_id,
        kind=kind,
        name=name,
        path=path,
        tinker_path=tinker_path(model_id, kind, name),
        base_model=meta["base_model"],
        lora_rank=lora["rank"],
        train_mlp=lora["train_mlp"],
        train_attn=lora["train_attn"],
        train_unembed=lora["train_unembed"],
        step=meta["step"],
        has_optimizer=meta["has_optimizer"],
        created_at=meta["created_at"],
        size_bytes=sum(f["size"] for f in meta["files"].values())
        + (path / META_FILE).stat().st_size,
        optimizer_config=optimizer_config_from(meta.get("optimizer_config", {"type": "adamw"})),
        user_metadata={str(k): str(v) for k, v in (meta.get("user_metadata") or {}).items()},
        identity=":".join(meta["files"][f]["sha256"] for f in (WEIGHTS_FILE, CONFIG_FILE)),
    )
