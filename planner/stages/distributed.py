"""The OBS database across processes with torch.distributed (`planner plan --distributed` under torchrun).

The blocks are split into contiguous ranges, one per rank. Block l's calibration inputs are block l-1's
outputs, so activations flow from rank to rank: each rank captures the inputs of block 0 itself (the
embeddings are cheap, and the masks, positions and rotary tables every block takes come with them), receives the
hidden states entering its first block from the rank before it, pushes them through its blocks once (forward
only) and sends the result on, and only then builds its blocks' databases, which is where the time goes, in
parallel with the other ranks. Every rank writes its layer files into the shared database directory; rank 0
gathers the index entries, writes the index and solves. NCCL on GPUs (one per rank, LOCAL_RANK), gloo on CPUs.
Only torch.distributed's own collectives are used (send/recv, an object broadcast, barrier).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..errors import PlannerError


@dataclass(frozen=True)
class Group:
    """This process's place in the job."""
    rank: int
    world: int
    device: str                         # "cpu", or "cuda:<LOCAL_RANK>"

    @property
    def first(self) -> bool:
        return self.rank == 0

    def blocks(self, n_blocks: int) -> range:
        """The contiguous blocks this rank builds (earlier ranks take one more when they do not divide evenly)."""
        per, extra = divmod(n_blocks, self.world)
        start = self.rank * per + min(self.rank, extra)
        return range(start, start + per + (self.rank < extra))


def init(device: str) -> Group:
    """Join the job torchrun started (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise PlannerError("--distributed runs under torchrun: torchrun --nproc-per-node N -m planner.cli plan "
                           "... --distributed (RANK and WORLD_SIZE are not set)")
    cuda = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    return Group(dist.get_rank(), dist.get_world_size(), device)


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def send_hidden(hidden: list[torch.Tensor], dst: int, device: str) -> None:
    """Per-batch hidden states (B, T, d) to rank `dst`: their shapes and dtype first, then each tensor."""
    dist.send_object_list([[(tuple(h.shape), str(h.dtype).removeprefix("torch.")) for h in hidden]], dst=dst,
                          device=_obj_device(device))
    for h in hidden:
        dist.send(h.contiguous().to(device), dst=dst)


def recv_hidden(src: int, device: str, home) -> list[torch.Tensor]:
    """What `send_hidden` sent, each on `home` (where this rank keeps its activations)."""
    meta = [None]
    dist.recv_object_list(meta, src=src, device=_obj_device(device))
    out = []
    for shape, dtype in meta[0]:
        t = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
        dist.recv(t, src=src)
        out.append(t.to(home))
    return out


def broadcast(obj, device: str):
    """rank 0's `obj` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=0, device=_obj_device(device))
    return box[0]


def barrier() -> None:
    dist.barrier()


def _obj_device(device: str):
    # object collectives pickle into a byte tensor: on NCCL that tensor must be on this rank's GPU
    return torch.device(device) if device.startswith("cuda") else None
