"""Which process this is among several: torch.distributed, as ``torchrun`` starts it.

``torchrun --nproc_per_node N -m dpa_lens attribute ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and the rendezvous address; `Processes.start` joins the process group (gloo: it moves
only small Python objects, on CPU, whatever device the model is on) and `Processes.barrier` waits for
every process. A plain ``python`` run is one process, and nothing here starts a group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from dpa_lens.errors import InputError


@dataclass
class Processes:
    """This process's ``rank`` among ``world`` processes (``local_rank`` on its machine)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    started_group: bool = False  # this object joined the process group, so it leaves it

    @classmethod
    def start(cls, rank: int | None = None, world: int | None = None) -> Processes:
        """The processes of this run: ``rank``/``world`` as given, else torchrun's environment, else one."""
        if (rank is None) != (world is None):
            raise InputError("pass both rank and world_size, or neither (torchrun sets them)")
        if rank is None:
            env_world = int(os.environ.get("WORLD_SIZE", "1"))
            rank, world = (int(os.environ.get("RANK", "0")), env_world) if env_world > 1 else (0, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not isinstance(world, int) or world < 1 or not 0 <= rank < world:
            raise InputError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank!r}, world_size={world!r}")
        procs = cls(rank=rank, world=world, local_rank=int(os.environ.get("LOCAL_RANK", rank)))
        if world > 1 and "MASTER_ADDR" in os.environ:
            dist = torch.distributed
            if not dist.is_initialized():
                dist.init_process_group("gloo", rank=rank, world_size=world)
                procs.started_group = True
            elif dist.get_world_size() != world:
                raise InputError(f"the process group has {dist.get_world_size()} processes, not world_size={world}")
        return procs

    @property
    def grouped(self) -> bool:
        """Whether the processes can wait for each other (a torch.distributed group of them)."""
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def owns(self, index: int) -> bool:
        """Whether the record at ``index`` is this process's (records are dealt round-robin)."""
        return index % self.world == self.rank

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for without a group)."""
        if self.grouped:
            torch.distributed.barrier()

    def all_ok(self, ok: bool) -> bool:
        """Whether every process says ``ok`` (a failure in one stops them all, not only itself)."""
        if not self.grouped:
            return ok
        flag = torch.tensor([0 if ok else 1])
        torch.distributed.all_reduce(flag)
        return int(flag) == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value``, on every process."""
        if not self.grouped:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def stop(self) -> None:
        """Leave the process group if `start` joined it."""
        if self.started_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
            self.started_group = False
