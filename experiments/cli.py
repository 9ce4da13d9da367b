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
posterior from another embedding dimension, an empty split) prints ``error: ...`` to
stderr, one line unless the message itself continues, and exits with status 2.
``--verbose`` adds the traceback to the log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_USER_ERROR = 2
# Files whose presence marks a directory as a run directory.
RUN_FILES = ("posterior.safetensors", "metrics.json", "config.yaml")
# Further outputs of a run (runner.STALE_OUTPUTS), which `run` and `fit` only overwrite with --force.
RUN_OUTPUTS = ("metrics.json", "scores.csv", "figures", "evaluation.json", "inference_data.nc")
DEFAULT_DEMO_DIR = "runs/demo"
# Default --fpr of `score`, the same as `saved_runs.score_images` (not imported here, so
# that `--help` does not load torch).
DEFAULT_SCORE_FPR = 0.05
# Metrics printed by `run` and `evaluate`, in this order.
SUMMARY_METRICS = ("image_auroc", "pixel_auroc", "aupro", "pixel_f1_max", "pixel_aupr", "dice_fpr10")


class UserError(Exception):
    """An error caused by the command's input, reported without a traceback."""


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
        epilog="examples:\n"
               "  dinodpmm demo                                    the whole pipeline on bundled images\n"
               "  dinodpmm run experiments/configs/lgg_flair.yaml --out runs/lgg\n"
               "  dinodpmm score runs/lgg scans/ --out scores      flag new images\n"
               "configs for the datasets of the method ship in experiments/configs/; "
               "`dinodpmm COMMAND --help` describes each command.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_verbose(parser, default=0)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = subparsers.add_parser(
        "run", help="embed, fit, score, evaluate and plot one experiment",
        description="Embed the images of CONFIG (through the embedding cache), fit the mixture to the normal "
                    "training patches, score the test images with the DPMM and the memory-bank baseline, and "
                    "write config.yaml, posterior.safetensors, metrics.json, scores.csv and figures/ to RUN_DIR. "
                    "An unknown key=value override is an error that lists the valid keys.",
    )
    _add_config_arguments(run)
    run.set_defaults(handler=_run)

    fit = subparsers.add_parser(
        "fit", help="embed the training images and fit the mixture only",
        description="Embed the normal training images of CONFIG and fit the mixture; write config.yaml and "
                    "posterior.safetensors to RUN_DIR for `score`, `evaluate` and `diagnose`.",
    )
    _add_config_arguments(fit)
    fit.set_defaults(handler=_fit)

    score = subparsers.add_parser(
        "score", help="score new images with a fitted run",
        description="Score each image with the run's posterior, write an anomaly-map overlay per image and "
                    "scores.csv, and flag images whose score exceeds the threshold set on the run's normal "
                    "validation images.",
    )
    score.add_argument("run_dir", metavar="RUN_DIR", help="directory written by `dinodpmm run` or `dinodpmm fit`")
    score.add_argument("images", nargs="+", metavar="IMAGE_OR_FOLDER", help="image files or folders of images")
    score.add_argument("--out", required=True, metavar="DIR", help="directory for scores.csv and the overlays")
    score.add_argument("--force", action="store_true",
                       help="replace the scores.csv and overlays of an earlier `score` in --out")
    score.add_argument("--fpr", type=float, default=DEFAULT_SCORE_FPR,
                       help="fraction of the run's normal validation images allowed above the threshold "
                            f"(default: {DEFAULT_SCORE_FPR})")
    score.set_defaults(handler=_score)

    evaluate = subparsers.add_parser(
        "evaluate", help="recompute the metrics of a saved run",
        description="Recompute the DPMM's metrics of RUN_DIR on its dataset as it is now, print them, and "
                    "write RUN_DIR/evaluation.json; metrics.json and the other files of the run stay as they are.",
    )
    evaluate.add_argument("run_dir", metavar="RUN_DIR", help="directory written by `dinodpmm run` or `dinodpmm fit`")
    evaluate.add_argument("--memory-bank", action="store_true",
                          help="score the memory-bank baseline too (exact nearest neighbours; minutes per "
                               "hundred images on a CPU)")
    evaluate.set_defaults(handler=_evaluate)

    demo = subparsers.add_parser(
        "demo", help="run the pipeline on texture images bundled with scikit-image",
        description="Cut scikit-image's grass photograph into tiles, paste synthetic defects cut from its brick "
                    "photograph into some test tiles (with exact masks), then fit, score, evaluate and plot as "
                    "`run` does, with the offline-texture backbone. Needs no download.",
    )
    demo.add_argument("--out", default=DEFAULT_DEMO_DIR, metavar="DIR", help=f"run directory (default: {DEFAULT_DEMO_DIR})")
    demo.add_argument("--fast", action="store_true", help="fewer tiles and steps, for a quick check")
    demo.add_argument("--force", action="store_true", help="overwrite a run directory that already contains a run")
    demo.set_defaults(handler=_demo)

    _register_optional(subparsers)
    for command in subparsers.choices.values():
        # -v works after the command name too; SUPPRESS keeps the top-level value then.
        if not any("-v" in action.option_strings for action in command._actions):
            _add_verbose(command, default=argparse.SUPPRESS)
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
    # ArviZ logs notes about optional packages at INFO on import, which are not about the run.
    logging.getLogger("arviz").setLevel(max(level, logging.WARNING))


def _load_config(args: argparse.Namespace):
    from .config import load_config

    return load_config(args.config, args.overrides)


def _check_run_out(out: str, force: bool) -> None:
    """Raise UserError when ``out`` is a file, or a run directory and ``force`` is off."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {out} is a file; pass a directory for the run.")
    existing = [name for name in dict.fromkeys((*RUN_FILES, *RUN_OUTPUTS)) if (path / name).exists()]
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
    written = "metrics.json, scores.csv" + (", figures/" if (Path(args.out) / "figures").is_dir() else "")
    print(f"run directory: {args.out} ({written})")
    return 0


def _fit(args: argparse.Namespace) -> int:
    from .runner import POSTERIOR_FILE, fit_from_config

    _check_run_out(args.out, args.force)
    fitted = fit_from_config(_load_config(args), args.out, progress=args.verbose > 0)
    print(json.dumps(fitted.posterior.describe(), indent=2, default=str))
    print(f"posterior: {args.out}/{POSTERIOR_FILE}")
    return 0


def _score(args: argparse.Namespace) -> int:
    from .runner import SCORES_FILE
    from .saved_runs import earlier_scores, score_images

    if not args.out.strip():
        raise UserError("--out is empty; pass the directory for scores.csv and the overlays.")
    out = Path(args.out)
    if any((out / name).exists() for name in RUN_FILES if name != "config.yaml"):
        raise UserError(f"--out {args.out} is a run directory; write the scores of new images to another folder.")
    if not 0.0 < args.fpr < 1.0:
        raise UserError(f"--fpr must lie in (0, 1), got {args.fpr}; pass for example 0.05.")
    earlier = earlier_scores(out)
    if earlier and not args.force:
        raise UserError(f"--out {args.out} already contains the output of an earlier `score` ({len(earlier)} "
                        "files); choose another folder or pass --force to replace it.")
    report = score_images(args.run_dir, args.images, args.out, fpr=args.fpr, replace=args.force)
    rows, reference = report.rows, report.reference
    print(f"run {args.run_dir}, backbone {rows[0]['backbone']}")
    if reference is None:
        print("no threshold: the run has no normal validation scores; run `dinodpmm evaluate "
              f"{args.run_dir}` to compute them")
    else:
        above = sum(value > report.threshold for value in reference.scores)
        print(f"threshold {report.threshold:.6g}: {above} of the run's {len(reference.scores)} normal "
              f"validation images score above it (--fpr {args.fpr:g})")
    print("score".rjust(12) + "normal %".rjust(10) + "  flag       path")
    for row in rows:
        if row["error"]:
            print(f"{'skipped':>12}{'':>10}  {'':<10} {row['path']}: {row['error']}")
            continue
        percentile = "" if row["normal_percentile"] == "" else f"{row['normal_percentile']:.1f}"
        flag = "anomalous" if row["above_threshold"] is True else ""
        print(f"{row['score']:12.6g}{percentile:>10}  {flag:<10} {row['path']}")
    skipped = sum(bool(row["error"]) for row in rows)
    scored = len(rows) - skipped
    print(f"scored {scored} image{'' if scored == 1 else 's'}" + (f", skipped {skipped}" if skipped else "")
          + f"; scores in {out / SCORES_FILE}, overlays in {out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from .saved_runs import EVALUATION_FILE, evaluate_run

    document = evaluate_run(args.run_dir, memory_bank=args.memory_bank, progress=args.verbose > 0)
    _print_summary(document)
    print(f"wrote {Path(args.run_dir) / EVALUATION_FILE}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    _check_run_out(args.out, args.force)
    metrics = run_demo(args.out, fast=args.fast, progress=args.verbose > 0)
    _print_summary(metrics)
    print(f"note: {metrics['note']}")
    print(f"figures: {metrics['figures_dir']}")
    return 0


def _print_summary(metrics: dict) -> None:
    from .plots import backbone_label

    methods = [method for method in ("dpmm", "memory_bank") if method in metrics]
    if "backbone" in metrics:
        print(f"{backbone_label(metrics['backbone'])}; score: {metrics.get('score', 'unknown')}")
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
    except BrokenPipeError:
        # The reader of stdout exited (`dinodpmm score ... | head`): stop quietly, and
        # point stdout at devnull so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _user_errors() as error:
        logger.debug("the command failed", exc_info=True)
        # Some messages continue on further lines (the places searched for weights,
        # the position of a YAML syntax error); print them whole.
        message = str(error) or type(error).__name__
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
