"""The `rayformers` command: every verb takes one YAML file plus dotted `key=value` overrides.

    rayformers train   CONFIG [k=v ...]    fine-tune with Ray Train
    rayformers tune    CONFIG [k=v ...]    hyper-parameter search with Ray Tune over training runs
    rayformers predict CONFIG [k=v ...]    batch inference with Ray Data, writes Parquet
    rayformers serve   CONFIG [k=v ...]    run the Ray Serve app (--export-config writes a Serve config)
    rayformers submit  CONFIG --address http://HOST:8265 [--verb train|predict|serve]
    rayformers config  CONFIG [k=v ...]    print the resolved, validated config
    rayformers report  CONFIG [k=v ...]    write train.output/report.html again from what the run left
    rayformers merge-adapter CONFIG OUT [k=v ...]  write predict.model's LoRA adapter merged into its base
    rayformers tasks                       list tasks, architectures, input columns
    rayformers demo-data TASK URI          write a small learnable dataset to URI/train and URI/eval

Mistakes a user can make end with exit code 2 and one line naming the key, file or URI.
"""

from __future__ import annotations

import argparse
import os
import sys

from errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rayformers", description="Fine-tune, batch-score and serve Transformers models on Ray."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb, text in (
        ("train", "fine-tune with Ray Train"),
        ("tune", "hyper-parameter search with Ray Tune over training runs (the `tune` section)"),
        ("predict", "batch inference to Parquet"),
        ("config", "print the resolved config"),
        ("serve", "run the Ray Serve application"),
        ("report", "write train.output/report.html again from the run's history.json and metrics.json"),
    ):
        p = verbs.add_parser(verb, help=text)
        p.add_argument("config", metavar="CONFIG", help="job YAML")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=3e-5")
        p.add_argument(
            "-v",
            "--verbose",
            action="store_true",
            help="also show Ray's and transformers' own log lines (or set RAYFORMERS_LOG_LEVEL=INFO)",
        )
        if verb == "serve":
            p.add_argument(
                "--export-config", metavar="FILE", help="write a Serve config YAML for `serve deploy` and exit"
            )
        if verb == "config":
            p.add_argument("--explain", action="store_true", help="every key with its value, default and meaning")
    p = verbs.add_parser("merge-adapter", help="write a LoRA adapter (predict.model) merged into its base model")
    p.add_argument("config", metavar="CONFIG", help="job YAML")
    p.add_argument("output", metavar="OUT", help="a new folder or URI for the full model")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. predict.model=s3://...")
    p = verbs.add_parser("submit", help="submit a verb as a Ray job to a cluster")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--verb", dest="job_verb", choices=("train", "predict", "serve", "tune"), default="train")
    p.add_argument("--no-wait", action="store_true", help="return once the job is submitted")
    verbs.add_parser("tasks", help="list tasks, architectures and input columns")
    p = verbs.add_parser("demo-data", help="write a small learnable dataset for a task")
    p.add_argument("task")
    p.add_argument("uri")
    p.add_argument("--rows", type=int, default=2000, help="training rows (eval gets a fifth of it)")
    p.add_argument("--seed", type=int, default=0)
    return parser


def run(argv: list[str]) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    # argparse fills `overrides` only up to the first option: KEY=VALUE after `--address URL` arrive here
    if rest and hasattr(args, "overrides") and all("=" in r and not r.startswith("-") for r in rest):
        args.overrides += rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if getattr(args, "verbose", False):
        os.environ["RAYFORMERS_LOG_LEVEL"] = "INFO"
    if args.verb == "tasks":
        from jobs.catalog import print_tasks

        print_tasks()
        return 0
    if args.verb == "demo-data":
        from jobs.catalog import write_demo_data

        write_demo_data(args.task, args.uri, args.rows, args.seed)
        return 0

    import models  # noqa: F401  (installs the task registry that the config checks a job against)
    from config import dump_config, explain_config, load_config

    cfg = load_config(args.config, args.overrides)
    if args.verb == "config":
        print(explain_config(cfg) if args.explain else dump_config(cfg), end="")
        return 0
    if args.verb == "train":
        from pipelines.train import train

        train(cfg)
        return 0
    if args.verb == "tune":
        from pipelines.tune import tune_search

        tune_search(cfg)
        return 0
    if args.verb == "report":
        from pipelines.report import rebuild

        print(f"report: {rebuild(cfg)}")
        return 0
    if args.verb == "merge-adapter":
        from pipelines.adapters import merge_adapter

        print(f"model: {merge_adapter(cfg, args.output)}")
        return 0
    if args.verb == "predict":
        from pipelines.predict import predict

        predict(cfg)
        return 0
    if args.verb == "serve":
        from jobs.serve import export_config, run_serve

        if args.export_config:
            export_config(cfg, args.config, args.overrides, args.export_config)
            return 0
        run_serve(cfg)
        return 0
    if args.verb == "submit":
        from jobs.submit import submit

        return submit(args.config, args.overrides, cfg, args.address, args.job_verb, wait=not args.no_wait)
    raise AssertionError(args.verb)


def main(argv: list[str] | None = None) -> None:
    try:
        code = run(sys.argv[1:] if argv is None else argv)
    except UserError as exc:
        print(f"rayformers: error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


if __name__ == "__main__":
    main()
