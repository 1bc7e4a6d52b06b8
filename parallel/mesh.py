"""Device meshes: one world, two views.

compute mesh  (dp_replicate, dp_shard, cp, tp): who sees which data and which heads.
storage mesh  (dp_replicate, fsdp, tp) with fsdp = dp_shard x cp flattened: parameters
              are sharded over fsdp, replicated over dp_replicate (HSDP) and split by
              heads/MLP columns over tp. cp ranks hold different video tokens, so
              their gradients are partial sums like dp's: the FSDP reduce-scatter over
              fsdp sums them (text is replicated over cp; see DESIGN.md decision 5).
Both meshes are built from the same rank grid with public APIs (no private flatten).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hvfunc.config import DiTConfig


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    """Parallel degrees; their product must equal the world size."""

    dp_replicate: int = 1
    """Data-parallel replicas (HSDP across nodes): params replicated, grads all-reduced."""
    dp_shard: int = -1
    """Fully sharded data parallel (ZeRO-3, the seed's "layerzero"); -1 takes what is left."""
    cp: int = 1
    """Ulysses context parallel over video tokens (all-to-all sequence <-> heads)."""
    tp: int = 1
    """Megatron tensor parallel over heads and MLP columns."""
    sequence_parallel: bool = False
    """With tp > 1: shard video tokens over tp outside the attention/MLP matmuls."""

    def resolve(self, world: int) -> ParallelConfig:
        fixed = self.dp_replicate * self.cp * self.tp * (1 if self.dp_shard == -1 else self.dp_shard)
        if min(self.dp_replicate, self.cp, self.tp) < 1 or self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"parallel degrees must be >= 1 (dp_shard may be -1): {self}")
        if self.dp_shard == -1:
            if world % fixed:
                raise ValueError(f"world size {world} is not divisible by dp_replicate*cp*tp = {fixed}")
            return ParallelConfig(dp_replicate=self.dp_replicate, dp_shard=world // fixed, cp=self.cp, tp=self.tp,
                                  sequence_parallel=self.sequence_parallel)
        if fixed != world:
            raise ValueError(f"dp_replicate*dp_shard*cp*tp = {fixed} but the world size is {world}")
        return self

    def check_model(self, cfg: DiTConfig) -> None:
        """Heads must split over tp x cp (Ulysses moves heads across cp inside each tp shard)."""
        if cfg.heads_num % (self.tp * self.cp):
            raise ValueError(f"heads_num {cfg.heads_num} is not divisible by tp*cp = {self.tp}*{self.cp}")
        if cfg.mlp_hidden % self.tp:
            raise ValueError(f"MLP width {cfg.mlp_hidden} is not divisible by tp = {self.tp}")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("sequence_parallel splits tokens over the tp ranks: it needs tp > 1")


@dataclass(frozen=True)
class Meshes:
    compute: DeviceMesh  # (dp_replicate, dp_shard, cp, tp)
    storage: DeviceMesh  # (dp_replicate, fsdp, tp)
    cfg: ParallelConfig

    def group(self, axis: str) -> dist.ProcessGroup:
        mesh = self.storage if axis == "fsdp" else self.compute
        return mesh.get_group(axis)

    def size(self, axis: str) -> int:
        mesh = self.storage if axis == "fsdp" else self.compute
        return mesh.size(mesh.mesh_dim_names.index(axis))

    def rank(self, axis: str) -> int:
        mesh = self.storage if axis == "fsdp" else self.compute
        return mesh.get_local_rank(axis)

    @property
    def data_rank(self) -> int:
        """Index of this rank's batch among the dp_replicate x dp_shard data shards."""
        return self.rank("dp_replicate") * self.size("dp_shard") + self.rank("dp_shard")

    @property
    def data_world(self) -> int:
        return self.size("dp_replicate") * self.size("dp_shard")


def build(cfg: ParallelConfig, *, device_type: str = "cpu") -> Meshes:
    """Both meshes over the default process group (call after dist.init_process_group)."""
    world = dist.get_world_size()
    cfg = cfg.resolve(world)
    grid = torch.arange(world).reshape(cfg.dp_replicate, cfg.dp_shard, cfg.cp, cfg.tp)
    compute = DeviceMesh(device_type, grid, mesh_dim_names=("dp_replicate", "dp_shard", "cp", "tp"))
    storage = DeviceMesh(device_type, grid.reshape(cfg.dp_replicate, cfg.dp_shard * cfg.cp, cfg.tp),
                         mesh_dim_names=("dp_replicate", "fsdp", "tp"))
    assert math.prod(compute.shape) == world
    return Meshes(compute, storage, cfg)
