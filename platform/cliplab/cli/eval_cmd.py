"""``cliplab eval --model MODEL --data PATH [--data ...]``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="zero-shot, retrieval and paper lenses for a trained model",
                       description="Evaluate a model on one or more sets, each scored in the objective's own "
                                   "geometry. A set with classnames.txt (cliplab data fashion-mnist, cliplab data "
                                   "emoji --eval, CLIP_benchmark webdatasets) gets zero-shot top-1/top-5/mean "
                                   "per-class accuracy; training shards get image<->text R@1/5/10, the lenses "
                                   "(effective rank, alignment, uniformity, Ajne; MERU's entailment rate and "
                                   "origin distances) and, with emoji group/subgroup metadata, image traversals "
                                   "toward [ROOT]. Shards are embedded as Ray tasks; the report is written as "
                                   "JSON and Markdown and logged to MLflow when a tracking URI is set.")
    p.add_argument("--model", required=True,
                   help="models:/NAME@ALIAS (MLflow registry), or a checkpoint folder, local or s3:// (or a run folder: its latest)")
    p.add_argument("--data", action="append", required=True, metavar="PATH_OR_S3_URL",
                   help="an eval set: a folder of .tar shards (or one holding test/ or val/), local or s3:// "
                        "(repeatable)")
    p.add_argument("--out", default=None, help="report folder (default: ./eval-reports/<time>)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow server for models:/ and for logging (default: MLFLOW_TRACKING_URI; none: no logging)")
    p.add_argument("--experiment", default="cliplab-eval", help="MLflow experiment (default cliplab-eval)")
    p.add_argument("--templates", default=None,
                   help="prompts for every classification set: openai (80), simple (7), emoji, fashion, or a "
                        "file (default: the set's templates.txt, else openai)")
    p.add_argument("--local", action="store_true", help="embed in this process instead of Ray tasks")
    p.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or a local Ray)")
    p.add_argument("--num-cpus", type=float, default=0.5, help="CPUs per embedding task (default 0.5)")
    p.add_argument("--device", default="auto",
                   help="where this process holds the model and scores: auto (a GPU when one is visible), cpu, "
                        "cuda[:N] (default auto)")
    p.add_argument("--gpus-per-task", type=float, default=0.0,
                   help="GPUs per Ray embedding task, fractional to share one (default 0: CPU tasks)")
    p.add_argument("--tasks", type=int, default=2, help="split shards into chunks until there are this many "
                                                        "tasks per set (default 2)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--traversals", type=int, default=200, help="images to traverse toward [ROOT] (0: none)")
    p.add_argument("--traversal-nearest", action="store_true",
                   help="traversals retrieve the nearest text even outside its entailment cone (default: only "
                        "texts whose cone holds the point, as MERU)")
    p.add_argument("--no-lenses", action="store_true", help="skip the lenses (retrieval/zero-shot only)")
    p.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: AWS_ENDPOINT_URL)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from cliplab.config import S3Config
    from cliplab.errors import ConfigError
    from cliplab.eval.runner import run_eval
    from cliplab.tracking.tracker import resolve_uri

    if args.num_cpus <= 0 or args.tasks < 1 or args.batch_size < 1 or args.traversals < 0:
        raise ConfigError("--num-cpus must be > 0, --tasks and --batch-size at least 1, --traversals at least 0")
    uri = resolve_uri(args.tracking_uri)
    out = Path(args.out) if args.out else Path("eval-reports") / time.strftime("%Y%m%d-%H%M%S")
    if not args.local and args.address:
        from cliplab.ray_connect import init_ray

        init_ray(args.address)

    def show(result) -> None:
        m = result.metrics
        if result.evalset.kind == "classification":
            line = (f"zero-shot top-1 {m['zeroshot_top1']:.4f}, top-5 {m['zeroshot_top5']:.4f}, mean per class "
                    f"{m['zeroshot_mean_per_class']:.4f} ({int(m['zeroshot_num_classes'])} classes, chance "
                    f"{m['zeroshot_chance_top1']:.4f})")
        else:
            line = (f"R@1 image->text {m['image_to_text_R1']:.4f}, text->image {m['text_to_image_R1']:.4f} "
                    f"(chance {m['retrieval_chance_R1']:.4f})")
            if "lens/entailment_rate" in m:
                line += f", entailment rate {m['lens/entailment_rate']:.4f}"
        print(f"{result.evalset.name}: {int(m['num_samples'])} samples: {line}")

    report = run_eval(args.model, args.data, out_dir=out, tracking_uri=uri, experiment=args.experiment,
                      use_ray=not args.local, num_cpus=args.num_cpus, min_tasks=args.tasks,
                      batch_size=args.batch_size, templates=args.templates, lenses=not args.no_lenses,
                      traversals=args.traversals, traversal_entailment=not args.traversal_nearest, s3cfg=S3Config(endpoint_url=args.endpoint_url),
                      progress=not args.quiet, device=args.device, num_gpus=args.gpus_per_task,
                      on_result=show)
    print(f"report: {report['files'][0]} and {report['files'][1]}")
    if "mlflow_run_id" in report:
        print(f"logged to MLflow run {report['mlflow_run_id']} (experiment {args.experiment})")
    return 0
