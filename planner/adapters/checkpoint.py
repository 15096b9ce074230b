"""Checkpoints: local Hugging Face directories (no hub), opened once and passed between stages; portable saving.

`Checkpoint.open(path)` reads and checks config.json and finds the family's adapter; the tokenizer, the
fingerprint (hash of the config and weight bytes) and the weights load only when asked for. Stages take a
Checkpoint instead of a path, so one job reads a model directory's config once and its weights as often as it
needs a fresh copy (`load()`), not once per helper.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from .. import hardware, io
from ..errors import PlannerError
from ..types import ArchShape
from . import get_adapter
from .base import Adapter
from .remote import modeling_planner_bert  # noqa: F401  (import check: the remote code must import)

# shared files every remote model file imports relatively: the common layers, and what differs between
# transformers releases
COMMON_REMOTE = ("planner_common.py", "planner_compat.py")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


@contextlib.contextmanager
def quiet_transformers():
    """transformers' per-load progress bars and reports off for the duration (planner prints its own
    progress), restored afterwards: importing planner leaves the user's logging settings alone."""
    log = transformers.utils.logging
    verbosity, bars = log.get_verbosity(), log.is_progress_bar_enabled()
    log.set_verbosity_error()
    log.disable_progress_bar()
    try:
        yield
    finally:
        log.set_verbosity(verbosity)
        if bars:
            log.enable_progress_bar()


def _one_line(e: Exception) -> str:
    msg = str(e).strip()
    return (msg.splitlines()[0] if msg else type(e).__name__)[:300]


def read_config(path) -> dict:
    """config.json of a model directory, checked: the directory exists and names its architecture."""
    path = Path(path)
    if not path.exists():
        raise PlannerError(f"model directory not found: {path}")
    if not path.is_dir():
        raise PlannerError(f"{path} is not a directory: pass a Hugging Face model directory (config.json + weights)")
    if not (path / "config.json").exists():
        raise PlannerError(f"{path} has no config.json: pass a Hugging Face model directory")
    cfg = io.read_json(path / "config.json", "model config")
    if not isinstance(cfg, dict) or "model_type" not in cfg:
        raise PlannerError(f"{path}/config.json has no model_type: cannot tell the architecture")
    return cfg


@dataclass(eq=False)
class Checkpoint:
    """One model directory: its config (read once), adapter, tokenizer and fingerprint; weights on demand."""
    path: Path
    config: dict                    # config.json as written
    adapter: Adapter

    @classmethod
    def open(cls, path) -> "Checkpoint":
        if isinstance(path, Checkpoint):
            return path
        path = Path(path)
        cfg = read_config(path)
        return cls(path, cfg, get_adapter(cfg["model_type"]))

    @functools.cached_property
    def hf_config(self) -> transformers.PretrainedConfig:
        """The transformers config object (no weights); what shapes and limits are read from."""
        fields = {k: v for k, v in self.config.items() if k not in ("architectures", "auto_map")}
        with quiet_transformers():
            return transformers.AutoConfig.for_model(**fields)

    @property
    def shape(self) -> ArchShape:
        return self.adapter.shape(self.hf_config)

    @property
    def causal_lm(self) -> bool:
        return self.adapter.causal_lm

    @property
    def record(self) -> dict:
        """The planner record of a compressed checkpoint (method, target, profile, source, origin); {} if dense."""
        return dict(self.config.get("planner") or {})

    @property
    def origin(self) -> str | None:
        """Fingerprint of the dense checkpoint this one descends from (None: dense, or an older planner's)."""
        return self.record.get("origin")

    @functools.cached_property
    def fingerprint(self) -> str:
        return fingerprint(self.path)

    @functools.cached_property
    def tokenizer(self):
        try:
            with quiet_transformers():
                return transformers.AutoTokenizer.from_pretrained(str(self.path), local_files_only=True)
        except Exception as e:
            raise PlannerError(f"could not load a tokenizer from {self.path}: {_one_line(e)}") from None

    def load(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        """A fresh copy of the model in eval mode, brought into the form the algorithms expect
        (`adapter.prepare_`). Compressed checkpoints load through the planner's copy of their code. The weights
        are read on the host, then moved to `device`."""
        hardware.check_device(device)
        if not any(p.suffix in WEIGHT_SUFFIXES for p in self.path.iterdir()):
            raise PlannerError(f"{self.path} has no weight files (*.safetensors or *.bin)")
        arch = (self.config.get("architectures") or ["AutoModel"])[0]
        cls = self.adapter.portable_class(arch) if arch.startswith("Planner") else getattr(transformers, arch, None)
        cls = cls or transformers.AutoModel
        try:
            with quiet_transformers():
                model = cls.from_pretrained(str(self.path), dtype=dtype, local_files_only=True)
        except Exception as e:  # corrupted or mismatched weights: say so in one line
            raise PlannerError(f"could not load model from {self.path}: {_one_line(e)}") from None
        self.adapter.prepare_(model)
        if torch.device(device).type == "cpu":
            _own_weights(model)
        return model.eval().to(device)

    def check_positions(self, n: int, what: str, extra: int = 0) -> None:
        self.adapter.check_positions(self.hf_config, n, what, extra)


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of .safetensors files (Linux; [] elsewhere)."""
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5].endswith(".safetensors"):
            a, b = parts[0].split("-")
            out.append((int(a, 16), int(b, 16)))
    return out


def _own_weights(model) -> None:
    """Give every CPU parameter memory of its own, handing the checkpoint file's pages back as it goes.

    from_pretrained maps safetensors files into memory: a weight is a view of the file, its pages count in the
    process's resident memory once read, and they stay there while any weight still views the file. So when
    apply replaces a block's weights by smaller ones, the old ones' pages stay resident next to the new: on a
    0.85 B Llama the sequential apply peaked at 1.81x the model's size. Copied here one weight at a time, each
    file view's pages dropped (madvise DONTNEED: a file mapping re-reads them if touched, nothing is lost), the
    process holds one copy of the model and frees what apply replaces."""
    maps = _file_mappings()
    if not maps:
        return
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    for p in model.parameters():
        if p.device.type != "cpu" or not p.numel():
            continue
        start, end = p.data_ptr(), p.data_ptr() + p.numel() * p.element_size()
        if not any(a <= start and end <= b for a, b in maps):
            continue                                                   # already the process's own memory
        p.data = p.data.clone()
        lo, hi = -(-start // page) * page, end // page * page          # whole pages inside the old view only
        if hi > lo:
            libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), 4)   # 4 = MADV_DONTNEED


def load_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """(model in eval mode, adapter) of a model directory."""
    ck = Checkpoint.open(path)
    return ck.load(device, dtype), ck.adapter


def load_tokenizer(path):
    return Checkpoint.open(path).tokenizer


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
    with io.atomic_dir(out_dir) as tmp, quiet_transformers():
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


def check_pair(comp: Checkpoint, dense: Checkpoint, fix: str) -> None:
    """Refuse a compressed and a dense checkpoint that do not belong together: another family, hidden size, layer
    count or vocabulary, or (where the compressed one records its origin) another dense checkpoint, by content:
    a copy of the right directory is the same checkpoint. `fix` says what to pass instead. Reads configs only
    (and hashes the dense weights where an origin is recorded)."""
    c, d = comp.shape, dense.shape
    if c.family != d.family:
        raise PlannerError(f"the compressed model is a {c.family} model, the dense one a {d.family}: {fix}")
    for what, a, b in (("hidden size", c.hidden, d.hidden), ("layer count", c.n_layers, d.n_layers),
                       ("vocabulary", c.vocab, d.vocab)):
        if a != b:
            raise PlannerError(f"the compressed and the dense model differ in {what} ({a} vs {b}): {fix}")
    if comp.origin is not None and comp.origin != dense.fingerprint:
        raise PlannerError(f"the compressed model was made from another checkpoint than the dense one given: {fix}")


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())
