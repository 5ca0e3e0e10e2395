"""
One training process, or one of several started by torchrun (DistributedDataParallel): each
trains on its own batches, the first (rank 0) evaluates, logs and writes the run's files.

    torchrun --standalone --nproc_per_node=2 train.py --arch transformer
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


@dataclass
class Processes:
    """One process, or one of several started by torchrun (DistributedDataParallel)."""
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def start(cls, device):
        if device.type == "cuda":  # TF32 matrix products (Ampere on); the models' running sums are not products
            torch.backends.cuda.matmul.allow_tf32 = True
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return cls(device)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
        return cls(device, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))

    @property
    def distributed(self):
        return self.world_size > 1 or dist.is_initialized()

    @property
    def master(self):
        return self.rank == 0  # the one process that evaluates, logs and writes files

    def wrap(self, model):
        if not self.distributed:
            return model
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def gather(self, obj):
        """Every process's obj, in rank order (a collective: all processes call it)."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, obj)
        return gathered

    def read_losses(self, losses, stop):
        """Recent losses averaged over processes, and whether any process was asked to stop: one sync."""
        values = torch.stack(losses + [torch.tensor(float(stop), device=self.device)])
        if self.distributed:
            dist.all_reduce(values)  # a NaN anywhere, or a stop anywhere, is seen everywhere
        values = values.tolist()
        return [v / self.world_size for v in values[:-1]], values[-1] > 0

    def finish(self):
        if self.distributed:
            dist.destroy_process_group()
