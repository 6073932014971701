"""The interconnect a DDP step pays for: all-reduce bandwidth over NCCL between this machine's GPUs.

    torchrun --nproc_per_node 2 benchmarks/allreduce.py [--mib 1752]

Reports, per dtype, the time of one all-reduce of ``--mib`` MiB (default: W.A.L.T-XL's 459M float32 gradients)
and the bus bandwidth (nccl-tests' convention: algorithm bandwidth x 2 (N - 1) / N), and whether the GPUs can
reach each other's memory directly (peer-to-peer). Run with NCCL_DEBUG=INFO to see the transport NCCL chose.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=float, default=459.4e6 * 4 / 2**20)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl")
    world = dist.get_world_size()
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        numel = int(args.mib * 2**20 / 4)  # the same element count: bf16 moves half the bytes
        x = torch.randn(numel, device="cuda", dtype=dtype)
        for _ in range(3):
            dist.all_reduce(x)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(args.repeats):
            dist.all_reduce(x)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / args.repeats
        gb = numel * x.element_size() / 1e9
        rows.append(
            {
                "dtype": str(dtype).split(".")[-1],
                "gb": gb,
                "ms": ms,
                "bus_gb_s": gb / ms * 1e3 * 2 * (world - 1) / world,
            }
        )
    if dist.get_rank() == 0:
        peer = [torch.cuda.can_device_access_peer(0, j) for j in range(1, torch.cuda.device_count())]
        print(json.dumps({"world": world, "peer_to_peer": peer, "rows": rows}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
