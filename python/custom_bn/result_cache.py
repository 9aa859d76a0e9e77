"""The result cache: the memory custom_bn holds for reuse, as torch.cuda.memory_reserved and
torch.cuda.empty_cache do for CUDA. Large CPU results (outputs and input gradients) that were
freed are kept, up to CUSTOM_BN_RESULT_CACHE_MB (default 1024; 0 turns the cache off), and
handed to the next result of a similar size, so that a training loop's results do not fault
in fresh pages every step."""

import torch


def cached_bytes() -> int:
    """Bytes of freed results held for reuse."""
    return torch.ops.custom_bn._result_cache_bytes()


def empty_cache() -> None:
    """Returns every cached block to the operating system. Results still alive are kept."""
    torch.ops.custom_bn._empty_result_cache()
