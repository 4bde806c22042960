"""Data: the shard format and builders, the emoji corpus, S3 sources and the Ray Data pipeline."""
