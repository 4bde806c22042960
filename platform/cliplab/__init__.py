"""cliplab: a Ray-distributed experiment platform for contrastive image-text learning."""

__version__ = "0.1.0"
