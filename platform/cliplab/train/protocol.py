"""What the Ray Train driver (:mod:`cliplab.train.launch`) and its workers
(:mod:`cliplab.train.worker`) agree on: the key of the value a worker returns to end a run without
a restart, the message for changed data, and the GPU check both run on a worker. A module of its
own so that neither imports the other's module for it."""

from __future__ import annotations

import os

STOPPED = "cliplab/stopped"  # the workers ended the run early, for this reason


def data_changed_message(checkpoint: str, step: int, changes: list[str]) -> str:
    return (f"the training data changed since checkpoint {checkpoint} (step {step}): {'; '.join(changes)}. "
            "Resuming would repeat some samples and skip others; resume on the data it was trained on, or pass "
            "--allow-data-change to continue from the saved position in the new plan")


def worker_sees_cuda() -> bool:
    """On a Train worker: whether torch sees the CUDA GPU Ray assigned. False only on Ray's simulated
    nodes (``RAY_FAKE_CLUSTER=1``: fake ``GPU`` resources, as ``ray.cluster_utils.AutoscalingCluster``
    launches), where training runs on the CPU; anywhere else a GPU torch cannot see is an error."""
    import torch

    if torch.cuda.is_available():
        return True
    if os.environ.get("RAY_FAKE_CLUSTER") == "1":
        return False
    raise RuntimeError(f"train.use_gpu is set and Ray gave this worker a GPU, but torch {torch.__version__} "
                       f"(CUDA build: {torch.version.cuda or 'none'}) sees no CUDA device: check the node's NVIDIA "
                       "driver and the image's torch build, or run with --set train.use_gpu=false")
