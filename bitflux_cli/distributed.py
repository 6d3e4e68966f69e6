"""The torchrun process group, shared by the stages that run on several ranks."""

import os


def launch_rank() -> int:
    """This process's rank in a ``torchrun`` job (``WORLD_SIZE`` > 1), without joining the group; 0 in a
    single process, whatever a stray ``RANK`` in the environment says (a shell variable, a scheduler's)."""
    return int(os.environ.get("RANK", "0")) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else 0


def init_distributed() -> tuple[int, int]:
    """(rank, world size); under ``torchrun`` (``WORLD_SIZE`` > 1) joins the process group once.

    CPU tensors go through gloo and CUDA tensors through NCCL (where torch was built with it), and
    each rank takes the GPU of its ``LOCAL_RANK``, so CPU tests and multi-GPU runs share this path.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    import torch  # here, not at the top: the CLI imports this module for launch_rank without loading torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if dist.is_nccl_available() else "gloo")
    return dist.get_rank(), world
