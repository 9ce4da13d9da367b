"""The ``dinodpmm`` command line.

Subcommands::

    dinodpmm run CONFIG.yaml [key=value ...] --out RUN_DIR    features, fit, scores, metrics, figures
    dinodpmm fit CONFIG.yaml [key=value ...] --out RUN_DIR    features and fit only
    dinodpmm score RUN_DIR IMAGE_OR_FOLDER ... --out DIR      anomaly maps and scores of new images
    dinodpmm evaluate RUN_DIR                                 recompute the metrics of a saved run
    dinodpmm demo [--out DIR]                                 the whole pipeline on bundled textures
    dinodpmm embed / cache                                    the embedding cache
    dinodpmm diagnose / compare                               posterior diagnostics, when installed

A user error (missing dataset or run directory, unknown backbone or config key, a
posterior from another embedding dimension, an empty split) prints one ``error: ...``
line to stderr and exits with status 2. ``--verbose`` adds the traceback to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
# Files whose presence marks a directory as a run directory.
RUN_FILES = ("posterior.safetensors", "metrics.json", "config.yaml")
DEFAULT_DEMO_DIR = "runs/demo"
# Metrics printed by `run` and `evaluate`, in this order.
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "pixel_aupr", "dice_fpr10")


class UserError(Exception):
    """An error caused by the command's input, reported as one line without a traceback."""


def _add_verbose(parser: argparse.ArgumentParser, *, default) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=default,
                        help="log progress (-v) or debug details and tracebacks (-vv)")


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", metavar="CONFIG.yaml", help="experiment config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, values parsed as YAML, e.g. fit.truncation=50")
    parser.add_argument("--out", required=True, metavar="RUN_DIR", help="run directory to write")
    parser.add_argument("--force", action="store_true",
                        help="overwrite a run directory that already contains a run")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the ``dinodpmm`` command."""
    parser = argparse.ArgumentParser(
        prog="dinodpmm",
        description="Unsupervised anomaly detection with a Dirichlet process mixture over patch embeddings.",
    )
    _add_verbose(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = subparsers.add_parser("run", help="embed, fit, score, evaluate and plot one experiment")
    _add_config_arguments(run)
    run.set_defaults(handler=_run)

    fit = subparsers.add_parser("fit", help="embed the training images and fit the mixture only")
    _add_config_arguments(fit)
    fit.set_defaults(handler=_fit)

    score = subparsers.add_parser("score", help="score new images with a fitted run")
    score.add_argument("run_dir", metavar="RUN_DIR", help="directory written by `dinodpmm run` or `dinodpmm fit`")
    score.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    score.add_argument("--out", required=True, metavar="DIR", help="directory for scores.csv and the overlays")
    score.set_defaults(handler=_score)

    evaluate = subparsers.add_parser("evaluate", help="recompute the metrics of a saved run")
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="directory written by `dinodpmm run`")
    evaluate.set_defaults(handler=_evaluate)

    demo = subparsers.add_parser("demo", help="run the pipeline on texture images bundled with scikit-image")
    demo.add_argument("--out", default=DEFAULT_DEMO_DIR, metavar="DIR", help=f"run directory (default: {DEFAULT_DEMO_DIR})")
    demo.add_argument("--fast", action="store_true", help="fewer tiles and steps, for a quick check")
    demo.set_defaults(handler=_demo)

    for command in (run, fit, score, evaluate, demo):
        _add_verbose(command, default=argparse.SUPPRESS)
    _register_optional(subparsers)
    return parser


def _register_optional(subparsers: argparse._SubParsersAction) -> None:
    from ..features import commands

    commands.register(subparsers)
    try:
        from . import diagnostics_cli
    except ImportError as error:
        # The diagnostics module is optional; without it `diagnose` and `compare` are absent.
        if error.name != f"{__package__}.diagnostics_cli":
            raise
        return
    diagnostics_cli.register(subparsers)


def _configure_logging(verbosity: int) -> None:
    levels = {0: logging.WARNING, 1: logging.INFO}
    level = levels.get(verbosity, logging.DEBUG)
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _load_config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _check_run_out(out: str, force: bool) -> None:
    """Raise UserError when ``out`` is a file, or a run directory and ``force`` is off."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the run.")
    existing = [name for name in RUN_FILES if (path / name).exists()]
    if existing and not force:
        raise UserError(
            f"--out {out} already contains a run ({', '.join(existing)}); choose another "
            "directory or pass --force to overwrite it."
        )


def _run(args: argparse.Namespace) -> int:
    from .runner import run_experiment

    _check_run_out(args.out, args.force)
    metrics = run_experiment(_load_config(args), args.out, progress=args.verbose > 0)
    _print_summary(metrics)
    print(f"run directory: {args.out} (metrics.json, scores.csv, figures/)")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .runner import POSTERIOR_FILE, fit_from_config

    _check_run_out(args.out, args.force)
    fitted = fit_from_config(_load_config(args), args.out, progress=args.verbose > 0)
    print(json.dumps(fitted.posterior.describe(), indent=2, default=str))
    print(f"posterior: {args.out}/{POSTERIOR_FILE}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .runner import SCORES_FILE, score_images

    out = Path(args.out)
    if any((out / name).exists() for name in RUN_FILES if name != "config.yaml"):
        raise UserError(f"--out {args.out} is a run directory; write the scores of new images to another folder.")
    rows = score_images(args.run_dir, args.images, args.out)
    for row in rows:
        print(f"{row['score']:.6g}\t{row['path']}")
    print(f"scored {len(rows)} images; scores and overlays in {args.out}/{SCORES_FILE}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .runner import evaluate_run

    _print_summary(evaluate_run(args.run_dir, progress=args.verbose > 0))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    metrics = run_demo(args.out, fast=args.fast, progress=args.verbose > 0)
    _print_summary(metrics)
    print(f"note: {metrics['note']}")
    print(f"figures: {metrics['figures_dir']}")
    return 0


def _print_summary(metrics: dict) -> None:
    methods = [method for method in ("dpmm", "memory_bank") if method in metrics]
    print("metric".ljust(16) + "".join(method.rjust(14) for method in methods))
    for key in SUMMARY_METRICS:
        values = [metrics[method].get(key) for method in methods]
        print(key.ljust(16) + "".join(("n/a" if v is None else f"{v:.4f}").rjust(14) for v in values))
    timings = metrics.get("timings_s", {})
    per_image = [timings.get(f"{method}_scoring_s_per_image") for method in methods]
    if all(value is not None for value in per_image):
        print("scoring ms/img".ljust(16) + "".join(f"{1000 * v:.3f}".rjust(14) for v in per_image))


def _user_errors() -> tuple[type[BaseException], ...]:
    from ..features import ImageReadError
    from .config import ConfigError
    from .runner import RunError

    # OSError covers unreadable or truncated images (PIL raises OSError subclasses) and
    # an --out that exists as a file.
    return (UserError, ConfigError, RunError, OSError, ImageReadError, ValueError)


def _parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides of ``run`` and ``fit`` after ``--out`` too.

    argparse does not collect a positional list that options interrupt, so overrides
    that follow ``--out RUN_DIR`` arrive as unknown arguments and are appended here.
    """
    args, extras = parser.parse_known_args(argv)
    if extras:
        if not hasattr(args, "overrides") or any(extra.startswith("-") or "=" not in extra for extra in extras):
            parser.error(f"unrecognized arguments: {' '.join(extras)}")
        args.overrides = [*args.overrides, *extras]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``dinodpmm`` command and return its exit status."""
    parser = build_parser()
    args = _parse(parser, argv)
    _configure_logging(args.verbose)
    try:
        return int(args.handler(args) or 0)
    except _user_errors() as error:
        logger.debug("the command failed", exc_info=True)
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
