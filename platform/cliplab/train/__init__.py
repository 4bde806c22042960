"""Training: the Ray-free step (``step``), the worker loop (``worker``) and launch (``launch``)."""
