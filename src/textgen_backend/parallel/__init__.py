"""Tensor parallelism (--num-shard): the ranks and their calls (`group.py`), the worker
processes (`worker.py`), which part of each weight a rank holds (`layout.py`)."""

# NVLink multicast (NVLS) off for every rank's process, set where the launcher starts
# tritonserver and where the engine starts its workers: on the lent multi-GPU machines it is
# not usable (the device library's KINDS.md). A user's own setting wins.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                 "NVSHMEM_DISABLE_NVLS": "1"}
