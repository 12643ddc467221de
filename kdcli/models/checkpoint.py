"""kdcli's checkpoint format: a safetensors file whose metadata describes the model.

The weights are the timm network's own ``state_dict`` (so plain timm can load them too); the
metadata (str→str, as safetensors requires) holds one JSON value under the key ``kdcli``.
Files are written atomically: a temporary file in the same folder, then a rename.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from kdcli import __version__
from kdcli.errors import KdcliError

META_KEY = "kdcli"


class ModelMeta(BaseModel):
    """What a checkpoint says about itself: enough to rebuild and feed the model."""

    format: Literal["kdcli-model"] = "kdcli-model"
    format_version: int = 1
    architecture: str
    num_classes: int
    in_chans: int
    input_size: int
    mean: list[float]
    std: list[float]
    interpolation: str = "bilinear"  # how the model's input is resized to input_size (timm's data config)
    crop_pct: float = 1.0  # the centre-crop fraction of its evaluation transform (timm's data config)
    class_names: list[str]
    trained: dict[str, Any] = {}
    kdcli_version: str = __version__


def atomic_path(path: Path) -> Path:
    """A new empty temporary file beside ``path``; rename it onto ``path`` once complete.

    Created with mode 0666 less the umask (0644 under the usual 022), as an ordinary file would be, so the
    renamed file is readable by whoever may read the folder (``tempfile.mkstemp`` would make it 0600).
    """
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


@functools.cache
def _file_mode() -> int:
    """0666 less the process's umask: the mode an ordinary new file gets."""
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def replace_atomic(tmp: Path, path: Path) -> None:
    """Move a completed temporary file onto ``path``, with the mode an ordinary new file gets (some writers,
    safetensors among them, create their files 0600 whatever the umask)."""
    os.chmod(tmp, _file_mode())
    os.replace(tmp, path)


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        tmp.write_text(text)
        replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save(path: Path, net: nn.Module, meta: ModelMeta) -> None:
    """Write ``net``'s weights and ``meta`` to ``path`` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = atomic_path(path)
    try:
        save_model(net, str(tmp), metadata={META_KEY: meta.model_dump_json()})
        replace_atomic(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_meta(path: Path, option: str = "--model") -> ModelMeta:
    """The description stored in a kdcli checkpoint, or one clear error."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
    except (SafetensorError, OSError, ValueError) as e:
        raise KdcliError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0]}); "
                         f"for other formats pass {option} ARCH {option}-weights FILE") from None
    if raw is None:
        raise KdcliError(f"{path} is a safetensors file but not a kdcli checkpoint (no architecture "
                         f"recorded); pass {option} ARCH {option}-weights {path}") from None
    try:
        return ModelMeta.model_validate(json.loads(raw))
    except (ValidationError, json.JSONDecodeError) as e:
        raise KdcliError(f"{path}: unreadable kdcli metadata ({str(e).splitlines()[0]})") from None


def load_into(net: nn.Module, path: Path) -> None:
    """Load a safetensors file's weights into ``net`` (strict)."""
    try:
        load_model(net, str(path), strict=True)
    except (RuntimeError, SafetensorError) as e:
        raise KdcliError(f"weights in {path} do not fit the architecture: {str(e).splitlines()[0][:300]}") from None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
