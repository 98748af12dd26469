"""The official DINOv3 trainer's checkpoints (SPEC.md §4): DCP (torch.distributed.checkpoint)
directories `<output_dir>/ckpt/<iteration>/` holding {"iteration", "model", "optimizer"}, where
"model" is the whole SSLMetaArch (`student.*`, `teacher.*`, `gram_teacher.*`, `dino_loss.*`, ...),
and sharded eval snapshots (a DCP of the teacher module: `backbone.*`, `dino_head.*`, ...).

    ckpt = find_official_checkpoint(path)   # the DCP folder, or an output_dir's latest
    sd = read_official_teacher(ckpt)  # {"teacher": {"backbone.cls_token": ..., "dino_head...."}}

so `--weights`, `model.pretrained_weights`, `gram.ckpt` and `distillation.teacher` take an
official run's teacher (heads included) without unsharding it first (USERS.md §5: v3#215,
v3#268, v3#311, v3#140). One process, no process group: the shards are read whole and only the
"model" entry is loaded (not the optimizer state, twice the model's size).

Safety: DCP's `.metadata` is a pickle (torch's FileSystemReader calls pickle.load). Loading a file
must never run code from it (DESIGN.md), so the metadata is read by an unpickler that admits only
the classes a DCP metadata file is made of (torch.distributed.checkpoint's metadata records,
torch.Size, dtypes, layouts, paths) and refuses anything else, naming it. The tensor data itself
is read as raw storage (torch.load with weights_only=True); non-tensor entries, which DCP would
unpickle with weights_only=False, are not read at all.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import torch

METADATA = ".metadata"

_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"),
    ("builtins", "set"),
    ("builtins", "frozenset"),
    ("builtins", "slice"),
    *(("pathlib", n) for n in ("Path", "PosixPath", "WindowsPath", "PurePosixPath",
                               "PureWindowsPath")),
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED or (module == "torch" and isinstance(
                getattr(torch, name, None), (torch.dtype, torch.memory_format))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"the checkpoint's {METADATA} asks for {module}.{name}, which a DCP metadata file "
            "does not hold: refused (loading a checkpoint never runs code from it)")


def read_metadata(path: Path):
    """The DCP metadata of checkpoint `path`, through the restricted unpickler."""
    with open(path / METADATA, "rb") as f:
        return _MetadataUnpickler(io.BytesIO(f.read())).load()


def _safe_reader(path: Path):
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = read_metadata(Path(self.path))
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader(str(path))


def is_dcp_checkpoint(path: Path) -> bool:
    return (path / METADATA).is_file()


def find_official_checkpoint(path: Path) -> Path | None:
    """`path` itself if it is a DCP checkpoint, else the latest `<path>/ckpt/<iteration>/` of an
    official output_dir (integer names, as the official checkpointer finds them); or None."""
    if is_dcp_checkpoint(path):
        return path
    ckpts = [p for p in (path / "ckpt").glob("*") if p.name.isdigit() and is_dcp_checkpoint(p)]
    return max(ckpts, key=lambda p: int(p.name)) if ckpts else None


def read_dcp_model(path: Path) -> dict[str, torch.Tensor]:
    """The "model" entry (flat names -> full tensors, on the CPU) of a DCP checkpoint."""
    import warnings

    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys

    # a refused pickle raises here, by name (inside DCP's load it would come back wrapped)
    entries = read_metadata(path).state_dict_metadata
    # the model's tensors only: DCP reads non-tensor entries with torch.load(weights_only=False)
    keys = {k for k, v in entries.items()
            if k.startswith("model.") and isinstance(v, TensorStorageMetadata)}
    if not keys:
        tops = sorted({k.split(".", 1)[0] for k in entries})
        raise KeyError(f"{path}: a DCP checkpoint without 'model' tensors (it holds "
                       f"{', '.join(tops) or 'nothing'})")
    with warnings.catch_warnings():  # "assuming ... a single process": that is the intent
        warnings.filterwarnings("ignore", message=".*single process.*")
        out = _load_state_dict_from_keys(keys=keys, storage_reader=_safe_reader(path))
    return out["model"]


def official_teacher(model: dict[str, torch.Tensor], where: Path) -> dict:
    """{"teacher": ...} of an official checkpoint's model state: the `teacher.*` keys of the whole
    SSLMetaArch, or the state itself when it is the teacher module (`backbone.*` keys)."""
    teacher = {k.removeprefix("teacher."): v for k, v in model.items() if k.startswith("teacher.")}
    if not teacher and any(k.startswith("backbone.") for k in model):
        teacher = dict(model)
    if not teacher:
        tops = sorted({k.split(".", 1)[0] for k in model})
        raise KeyError(f"{where}: the checkpoint's model holds no teacher (top-level names: "
                       f"{', '.join(tops[:10])})")
    return {"teacher": teacher}


def read_official_teacher(ckpt: Path) -> dict:
    """{"teacher": ...} of an official DCP checkpoint directory (find_official_checkpoint)."""
    return official_teacher(read_dcp_model(ckpt), ckpt)
