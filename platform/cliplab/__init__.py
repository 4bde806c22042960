"""cliplab: a Ray-distributed experiment platform for contrastive image-text learning.

The package is one stack; a module imports only from its own layer and the layers below it, and
no import runs in a circle (``tests/test_layering.py`` reads every import, lazy ones included).
Top to bottom:

    cli                     the ``cliplab`` command
    demo, submit            ``cliplab demo``; ``cliplab submit`` (Ray jobs)
    tune                    sweeps on Ray Tune, promotion, sweep reports
    train                   Ray Train: launch, the worker loop, the Ray-free step
    eval                    scoring in the objective's geometry, lenses, ``cliplab eval``
    tracking                the MLflow tracker and spool, the pyfunc model, the registry
    checkpoint              the checkpoint format: write, find, :func:`~cliplab.checkpoint.load_module`
    data                    shards, the decoder, sources (S3), eval sets, prompt templates, pipeline
    config, experiments     the experiment config; the bases sweep files start from
    models                  open_clip models and the DualEncoder
    objectives              the contrastive objectives
    distributed, errors, ray_connect, redaction, report, services, this module (``__version__``)

This module owns ``__version__``. May import: nothing.
"""

__version__ = "0.1.0"
