"""Checkpoints: safetensors files written atomically, holding weights, optimizer state and config.

A checkpoint is one ``.safetensors`` file. Tensors are stored under prefixes (``model.``,
``optimizer.state.<param>.<name>``, ...) and everything else (config, epoch, optimizer
hyper-parameters) as JSON in the safetensors metadata, so no pickle is ever loaded.

Files are written to a temporary name in the same folder, flushed to disk, then renamed over the
target: a crash leaves either the old file or the new one, never a torn file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

FORMAT = "ddad-checkpoint-v1"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then move the finished file to ``path`` atomically, with the permissions
    the user's umask gives new files (not the private 0600 of a temporary file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(path, write)


def _flatten_optimizer(state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{pid}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Mapping[str, torch.Tensor], meta: Mapping) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            pid, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(pid), {})[name] = value
    for pid, values in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(
    path: Path,
    modules: Mapping[str, torch.nn.Module | Mapping[str, torch.Tensor]],
    info: Mapping[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
) -> None:
    """Write ``modules`` (name -> module or state_dict), optional optimizer state, and JSON ``info``."""
    tensors: dict[str, torch.Tensor] = {}
    for prefix, module in modules.items():
        sd = module.state_dict() if isinstance(module, torch.nn.Module) else module
        for k, v in sd.items():
            tensors[f"{prefix}.{k}"] = v.detach().cpu().contiguous()
    meta: dict[str, str] = {"format": FORMAT, "info": json.dumps(info)}
    if optimizer is not None:
        opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
        meta["optimizer"] = json.dumps(opt_meta)
    # safetensors refuses tensors that share memory; clone any that do.
    seen: dict[int, str] = {}
    for k, v in list(tensors.items()):
        ptr = v.untyped_storage().data_ptr() if v.numel() else -1
        if ptr in seen and ptr != -1:
            tensors[k] = v.clone()
        seen[ptr] = k
    atomic_write(Path(path), lambda tmp: save_file(tensors, tmp, metadata=meta))


class Checkpoint:
    """A loaded checkpoint: ``info`` (dict), ``state_dict(prefix)``, ``optimizer_state()``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {self.path}")
        try:
            with safe_open(str(self.path), framework="pt") as fh:
                meta = fh.metadata() or {}
                self.keys = list(fh.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"cannot read checkpoint {self.path}: {exc}") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{self.path} is not a ddad checkpoint (format {meta.get('format')!r})")
        self.info: dict = json.loads(meta.get("info", "{}"))
        self._optimizer_meta = json.loads(meta["optimizer"]) if "optimizer" in meta else None

    def _read(self, prefix: str) -> dict[str, torch.Tensor]:
        """Only the tensors under ``prefix`` (detection never reads the optimizer state)."""
        with safe_open(str(self.path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in self.keys if k.startswith(prefix)}

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        return load_file(str(self.path))

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        p = prefix + "."
        sd = {k[len(p):]: v for k, v in self._read(p).items()}
        if not sd:
            raise KeyError(f"checkpoint {self.path} holds no {prefix!r} weights")
        return sd

    def has(self, prefix: str) -> bool:
        return any(k.startswith(prefix + ".") for k in self.keys)

    def optimizer_state(self) -> dict | None:
        if self._optimizer_meta is None:
            return None
        return _unflatten_optimizer(self._read("optimizer."), self._optimizer_meta)
