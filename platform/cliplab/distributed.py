"""The distributed context objectives see, and gather-with-gradient.

Objectives compute local rows against global columns: each rank gathers every rank's features
*with* gradient, so that after DDP averages gradients the result equals the gradient of the
global-batch loss (open_clip's ``local_loss`` + ``gather_with_grad``). No Ray here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Rank and world size of the data-parallel group (1 process: rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1

    @classmethod
    def current(cls) -> DistContext:
        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from all ranks along dim 0, differentiably (a no-op on 1 rank)."""
        if self.world_size == 1:
            return t
        from torch.distributed._functional_collectives import all_gather_single_autograd, wait_tensor

        return wait_tensor(all_gather_single_autograd(t.contiguous(), gather_dim=0, group=dist.group.WORLD))

    def gather_no_grad(self, t: torch.Tensor) -> torch.Tensor:
        """Concatenate ``t`` from all ranks without gradient (targets, labels, side data)."""
        if self.world_size == 1:
            return t
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t.contiguous())
        return torch.cat(out, dim=0)

    def broadcast_flag(self, value: bool, src: int = 0) -> bool:
        """Rank ``src``'s ``value`` on every rank (a collective: call it on all ranks at once)."""
        if self.world_size == 1:
            return bool(value)
        device = torch.device("cpu")
        if dist.get_backend() == "nccl":  # NCCL moves only CUDA tensors
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if value else 0], dtype=torch.int32, device=device)
        dist.broadcast(flag, src=src)
        return bool(flag.item())
