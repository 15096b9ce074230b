"""Loading and saving models: local Hugging Face directories only (no hub), portable pruned checkpoints."""
from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
import transformers

from .. import io
from . import get_adapter
from .remote import modeling_planner_bert  # noqa: F401  (import check: the remote code must import)
from ..errors import PlannerError

# shared files every remote model file imports relatively: the common layers, and what differs between
# transformers releases
COMMON_REMOTE = ("planner_common.py", "planner_compat.py")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
os.environ.setdefault("HF_HUB_OFFLINE", "1")      # a local directory never needs the network
# planner prints its own progress; transformers' per-load bars and reports would drown it
transformers.utils.logging.disable_progress_bar()
transformers.utils.logging.set_verbosity_error()
try:
    from huggingface_hub.utils import disable_progress_bars
    disable_progress_bars()
except ImportError:  # pragma: no cover
    pass


def _config_dict(path: Path) -> dict:
    if not path.exists():
        raise PlannerError(f"model directory not found: {path}")
    if not path.is_dir():
        raise PlannerError(f"{path} is not a directory: pass a Hugging Face model directory (config.json + weights)")
    if not (path / "config.json").exists():
        raise PlannerError(f"{path} has no config.json: pass a Hugging Face model directory")
    cfg = io.read_json(path / "config.json", "model config")
    if "model_type" not in cfg:
        raise PlannerError(f"{path}/config.json has no model_type: cannot tell the architecture")
    return cfg


def load_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, adapter). Pruned checkpoints load through the planner's copy of their code."""
    path = Path(path)
    cfg = _config_dict(path)
    adapter = get_adapter(cfg["model_type"])
    if not any(p.suffix in WEIGHT_SUFFIXES for p in path.iterdir()):
        raise PlannerError(f"{path} has no weight files (*.safetensors or *.bin)")
    arch = (cfg.get("architectures") or ["AutoModel"])[0]
    cls = adapter.portable_class(arch) if arch.startswith("Planner") else getattr(transformers, arch, None)
    if cls is None:
        cls = transformers.AutoModel
    try:
        model = cls.from_pretrained(str(path), dtype=dtype)
    except Exception as e:  # corrupted or mismatched weights: say so in one line
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlannerError(f"could not load model from {path}: {msg[:300]}") from None
    adapter.prepare_(model)
    model.eval().to(device)
    return model, adapter


def load_tokenizer(path):
    try:
        return transformers.AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlannerError(f"could not load a tokenizer from {path}: {msg[:300]}") from None


def fingerprint(path) -> str:
    """Identity of a checkpoint: hash of config.json and of the weight files' bytes."""
    path = Path(path)
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES:
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 22), b""):
                    h.update(chunk)
    return h.hexdigest()[:16]


def save_portable(model, adapter, src_dir, out_dir, extra_config: dict | None = None) -> Path:
    """Write a directory that loads with `from_pretrained(out, trust_remote_code=True)` without the planner.

    Tokenizer and sentence-transformers files are copied from `src_dir`; the weights are safetensors.
    The directory appears atomically: it is built under a temporary name and renamed.
    """
    src_dir, out_dir = Path(src_dir), Path(out_dir)
    adapter.save_config_(model)
    if extra_config:
        for k, v in extra_config.items():
            setattr(model.config, k, v)
    # save_pretrained rewrites config.architectures with the class it sees: keep the portable entries aside
    portable = {k: copy.deepcopy(getattr(model.config, k)) for k in ("architectures", "auto_map", "planner_layers")}
    with io.atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        cfg = json.loads((tmp / "config.json").read_text())
        cfg.update(portable)
        model.config.architectures = portable["architectures"]
        (tmp / "config.json").write_text(io.dumps(cfg))
        for name in (adapter.remote_file, *COMMON_REMOTE):         # the model file imports the common ones
            shutil.copy(Path(__file__).parent / "remote" / name, tmp / name)
        for p in src_dir.iterdir():
            if p.name in ("config.json", "README.md", ".gitattributes") or p.suffix in WEIGHT_SUFFIXES:
                continue
            if p.name.startswith("modeling_") or p.name.startswith("configuration_"):
                continue
            dst = tmp / p.name
            if p.is_dir():
                if not any(q.suffix in WEIGHT_SUFFIXES for q in p.rglob("*")):
                    shutil.copytree(p, dst)
            elif not dst.exists():
                shutil.copy(p, dst)
    return out_dir


def is_planner_model(path) -> bool:
    """Whether directory `path` holds a model planner wrote (apply / recover output), which a rerun may replace."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and ("planner" in cfg or "planner_layers" in cfg)


def origin(model) -> str | None:
    """Fingerprint of the dense checkpoint a planner-compressed model descends from (None: not recorded, e.g. a
    dense model or one saved by an older planner)."""
    rec = getattr(model.config, "planner", None) or {}
    return rec.get("origin")


def check_pair(comp, adapter, dense, d_adapter, fix: str, dense_fingerprint: str | None = None) -> None:
    """Refuse a compressed model and a dense model that do not belong together: another family, hidden size,
    layer count or vocabulary, or (where the dense checkpoint's fingerprint is given and the compressed model
    records its origin) another dense checkpoint. `fix` says what to pass instead."""
    c, d = adapter.shape(comp), d_adapter.shape(dense)
    if c.family != d.family:
        raise PlannerError(f"the compressed model is a {c.family} model, the dense one a {d.family}: {fix}")
    for what, a, b in (("hidden size", c.hidden, d.hidden), ("layer count", len(adapter.layers(comp)),
                       len(d_adapter.layers(dense))), ("vocabulary", c.vocab, d.vocab)):
        if a != b:
            raise PlannerError(f"the compressed and the dense model differ in {what} ({a} vs {b}): {fix}")
    mine = origin(comp)
    if dense_fingerprint is not None and mine is not None and mine != dense_fingerprint:
        raise PlannerError(f"the compressed model was made from another checkpoint than the dense one given: {fix}")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
