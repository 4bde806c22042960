"""Data: the shard format and builders, the one sample decoder, S3 sources and run storage's
filesystem, the emoji corpus, zero-shot eval sets and their prompt templates, the shard index and
plan, and the Ray Data pipeline.

May import: config, models, errors (the layers below it). Never checkpoint, tracking, eval, train,
tune, submit, demo or cli.
"""
