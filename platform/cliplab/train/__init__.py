"""Training: the Ray-free step (``step``), the worker loop (``worker``), launch (``launch``) and what
the two share (``protocol``), with the schedule and metering.

May import: eval (the in-training eval), tracking, checkpoint, data, config, models, objectives and
the foundations (ray_connect for the Ray connection). Never tune, submit, demo or cli.
"""
