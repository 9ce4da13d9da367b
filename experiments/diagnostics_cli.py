"""The ``dinodpmm diagnose`` and ``dinodpmm compare`` subcommands.

:func:`register` adds both to the subparsers of the ``dinodpmm`` command; each handler is a
function ``(args) -> int`` stored as ``args.handler``.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

POSTERIOR_FILE = "posterior.safetensors"
INFERENCE_DATA_FILE = "inference_data.nc"
# Under the run's figures folder, so the run's own figures of the same names stay.
FIGURES_DIR = "figures/diagnostics"

# The names of `compare.ALGORITHMS`, written out so that building the parser does not
# import torch; a test checks that the two agree.
COMPARE_ALGORITHMS = ("svi", "gibbs", "online-em", "sklearn")

# Convergence limits that `diagnose` warns about. R-hat below 1.01 is the rule of
# Vehtari et al. (2019, "Rank-normalization, folding, and localization", arXiv:1903.08008).
# The bulk-ESS floor of 100 draws per chain is this project's choice.
MAX_RHAT = 1.01
MIN_ESS_PER_CHAIN = 100

# Exit status for a user error (missing file or folder, invalid option), as argparse uses.
USAGE_ERROR = 2


def register(subparsers) -> None:
    """Add the ``diagnose`` and ``compare`` subcommands to ``subparsers``."""
    diagnose = subparsers.add_parser(
        "diagnose",
        help="convergence summary, netCDF inference data and diagnostic plots of a fitted run",
        description=(
            f"Read RUN_DIR/{POSTERIOR_FILE}, write RUN_DIR/{INFERENCE_DATA_FILE}, print the ArviZ "
            f"summary (R-hat, bulk and tail ESS) and write figures under RUN_DIR/{FIGURES_DIR}/."
        ),
    )
    diagnose.add_argument("run_dir", type=Path, metavar="RUN_DIR",
                          help="run folder that contains posterior.safetensors")
    diagnose.add_argument(
        "--num-points", type=int, default=None,
        help="points whose occupied components are counted (default: the number the posterior was fitted on)",
    )
    diagnose.add_argument("--num-samples", type=int, default=1000,
                          help="draws from a variational posterior (default: 1000)")
    diagnose.add_argument("--seed", type=int, default=0, help="seed of the variational draws (default: 0)")
    diagnose.set_defaults(handler=run_diagnose)

    compare = subparsers.add_parser(
        "compare",
        help="fit several inference algorithms on the same embeddings and tabulate them",
        description=(
            "Embed the training and test images of CONFIG once, fit each algorithm on the same "
            "training patches, and write a markdown table, a CSV file and a figure with held-out "
            "log-likelihood, number of components, wall time and image and pixel AUROC."
        ),
    )
    compare.add_argument("config", type=Path, metavar="CONFIG.yaml", help="experiment configuration (YAML)")
    compare.add_argument("overrides", nargs="*", metavar="key=value",
                         help="config overrides with dotted keys, e.g. fit.gibbs.subsample=5000")
    # No argparse `choices`: overrides written after the list land in it and are moved
    # to `overrides` by `run_compare`, which then checks the names.
    compare.add_argument(
        "--algorithms", nargs="+", default=list(COMPARE_ALGORITHMS), metavar="{" + ",".join(COMPARE_ALGORITHMS) + "}",
        help="algorithms to fit (default: all)",
    )
    compare.add_argument(
        "--out", type=Path, default=None, help="output folder (default: ./compare-<config file name without suffix>)"
    )
    compare.set_defaults(handler=run_compare)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return USAGE_ERROR


def run_diagnose(args: argparse.Namespace) -> int:
    """Write the inference data, print the summary and write the figures of ``args.run_dir``."""
    from ..inference.diagnostics import inference_data, plot_diagnostics, save_inference_data
    from ..inference.posterior import Posterior

    problem = _check_diagnose_options(args)
    if problem is not None:
        return _error(problem)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        return _error(f"run folder not found: {run_dir}; pass the folder that `dinodpmm fit` wrote.")
    posterior_path = run_dir / POSTERIOR_FILE
    if not posterior_path.is_file():
        return _error(f"{POSTERIOR_FILE} not found in {run_dir}; fit a posterior there first.")
    try:
        posterior = Posterior.load(posterior_path)
        idata = inference_data(posterior, args.num_points, args.num_samples, args.seed)
    except ValueError as error:
        return _error(str(error))

    netcdf_path = save_inference_data(idata, run_dir / INFERENCE_DATA_FILE)
    print(f"inference data: {netcdf_path}")
    _print_summary(idata)
    for path in plot_diagnostics(idata, run_dir / FIGURES_DIR):
        print(f"figure: {path}")
    return 0


def _check_diagnose_options(args: argparse.Namespace) -> str | None:
    """Return a message for the first invalid numeric option of ``diagnose``, or None."""
    if args.num_points is not None and args.num_points < 1:
        return (f"--num-points must be a positive integer, got {args.num_points}; omit it to use "
                "the number of points the posterior was fitted on.")
    if args.num_samples < 1:
        return f"--num-samples must be a positive integer, got {args.num_samples}; the default is 1000."
    # torch.Generator.manual_seed takes seeds in [0, 2**64).
    if not 0 <= args.seed < 2**64:
        return f"--seed must be an integer in [0, 2**64), got {args.seed}; the default is 0."
    return None


def _print_summary(idata) -> None:
    from ..inference.diagnostics import summarize

    attributes = idata.posterior.attrs
    num_chains = idata.posterior.sizes["chain"]
    print(f"algorithm: {attributes['algorithm']}, backbone: {attributes['backbone']}, chains: {num_chains}")
    if num_chains < 2:
        print(
            "R-hat needs several chains: this posterior is one chain of independent variational "
            "draws, so R-hat is NaN and the ESS only reflects the number of draws."
        )
    summary, constants = summarize(idata)
    if summary is not None:
        print(summary.to_string())
        if num_chains >= 2:
            for line in convergence_warnings(summary, num_chains):
                print(line)
    for name, value in constants.items():
        print(f"{name} is constant at {value:g} in every draw (no R-hat or ESS)")


def convergence_warnings(summary, num_chains: int) -> list[str]:
    """Return a warning line for each variable of ``summary`` whose R-hat or bulk ESS shows poor mixing.

    R-hat must stay below ``MAX_RHAT`` and the bulk ESS reach ``MIN_ESS_PER_CHAIN``
    per chain.
    """
    lines = []
    for name, row in summary.iterrows():
        # ArviZ returns NaN for chains too short to split.
        if math.isnan(row["r_hat"]) or math.isnan(row["ess_bulk"]):
            lines.append(f"warning: R-hat and ESS of {name} are undefined, because each chain has too few "
                         "kept draws (ArviZ needs at least 4); run more sweeps.")
            continue
        if not row["r_hat"] <= MAX_RHAT:
            lines.append(f"warning: R-hat of {name} is {row['r_hat']:.3g}, above {MAX_RHAT}: the chains have not "
                         "converged to one distribution; run more sweeps (fit.gibbs.num_sweeps) or a longer burn-in.")
        if not row["ess_bulk"] >= MIN_ESS_PER_CHAIN * num_chains:
            lines.append(f"warning: bulk ESS of {name} is {row['ess_bulk']:.0f}, below {MIN_ESS_PER_CHAIN} per chain "
                         f"({MIN_ESS_PER_CHAIN * num_chains} for {num_chains} chains): posterior summaries are "
                         "noisy; run more sweeps.")
    return lines


def run_compare(args: argparse.Namespace) -> int:
    """Fit ``args.algorithms`` on the embeddings of ``args.config`` and write the comparison."""
    from .compare import ALGORITHMS, markdown_table
    from .config import ConfigError, load_config
    from .runner import RunError

    overrides = [*args.overrides, *(name for name in args.algorithms if "=" in name)]
    # dict.fromkeys drops repeated names and keeps the order.
    algorithms = list(dict.fromkeys(name for name in args.algorithms if "=" not in name))
    unknown = [name for name in algorithms if name not in ALGORITHMS]
    if unknown or not algorithms:
        invalid = " ".join(unknown) if unknown else "none"
        return _error(f"--algorithms takes names from {', '.join(ALGORITHMS)}, got {invalid}.")
    if not Path(args.config).is_file():
        return _error(f"config file not found: {args.config}; pass a YAML experiment configuration.")
    out_dir = Path(args.out) if args.out is not None else Path(f"compare-{Path(args.config).stem}")
    if out_dir.exists() and not out_dir.is_dir():
        return _error(f"--out {out_dir} is a file; pass a directory for the comparison.")
    try:
        config = load_config(args.config, overrides)
        comparison = _prepare_comparison(config)
    except (ConfigError, RunError, FileNotFoundError) as error:
        return _error(str(error))
    rows = []
    for name in algorithms:
        # Fits take from seconds to many minutes, so each one is announced, and the
        # table is rewritten after each so that an interrupted run keeps its rows.
        print(f"fitting {name} on {comparison.train_description(name)} ...", flush=True)
        rows += comparison.run(name)
        rows[-1]["backbone"] = comparison.options["provenance"]["backbone"]["name"]
        print(f"{name}: fitted in {rows[-1]['wall_time_s']:.1f} s, image AUROC {rows[-1]['image_auroc']:.4f}, "
              f"pixel AUROC {rows[-1]['pixel_auroc']:.4f}", flush=True)
        paths = _write_comparison(rows, out_dir, comparison.backbone)
    print(markdown_table(rows))
    for path in paths:
        print(f"wrote {path}")
    return 0


@dataclasses.dataclass
class _Comparison:
    """The embeddings, options and evaluation shared by every algorithm of one comparison."""

    train: Any
    heldout: Any
    options: dict
    evaluate: Any
    backbone: str

    def train_description(self, name: str) -> str:
        """Describe the training patches that algorithm ``name`` is fitted on, for the progress line."""
        total = len(self.train)
        if name == "gibbs":
            gibbs = self.options["gibbs"]
            seen = total if gibbs["subsample"] is None else min(gibbs["subsample"], total)
            return f"{seen} of {total} patches, {gibbs['num_chains']} chains of {gibbs['num_sweeps']} sweeps"
        if name == "sklearn":
            subsample = self.options["sklearn"]["subsample"]
            seen = total if subsample is None else min(subsample, total)
            return f"{seen} of {total} patches, at most {self.options['sklearn']['max_iter']} iterations"
        return f"{total} patches"

    def run(self, name: str) -> list[dict]:
        """Fit ``name`` and return its row of the comparison."""
        from .compare import compare_algorithms

        return compare_algorithms(self.train, self.heldout, [name], self.options, evaluate=self.evaluate)


def _prepare_comparison(config) -> _Comparison:
    """Embed the images of ``config`` once and collect what every algorithm's fit needs."""
    import numpy as np

    from ..features import EmbeddingCache, embed_split
    from . import plots
    from .compare import merged_options
    from .config import resolve_paths
    from .runner import backbone_from_config, evaluate_method, image_offsets, prepare_data, score_name
    from .scoring import patch_scores

    config = resolve_paths(config)
    data = prepare_data(config)
    backbone = backbone_from_config(config)
    cache = EmbeddingCache(config.cache.dir, dtype=config.cache.dtype)
    splits = {
        role: embed_split(backbone, samples, cache, batch_size=config.backbone.batch_size, progress=False,
                          description=role)
        for role, samples in (("train", data.train), ("threshold", data.threshold), ("test", data.test))
    }
    score = score_name(config, backbone)

    def evaluate(posterior):
        def scorer(patches):
            return patch_scores(posterior, patches, score, config.score.min_weight)

        metrics = evaluate_method(scorer, splits["test"], splits["threshold"], data, config).metrics
        return {"image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"]}

    fit, gibbs = config.fit, config.fit.gibbs
    alpha_prior = tuple(fit.alpha_prior) if fit.alpha_prior is not None else None
    options = {
        "truncation": fit.truncation, "covariance": fit.covariance, "seed": fit.seed,
        "provenance": {"backbone": backbone.describe()},
        "svi": {"alpha": fit.alpha, "alpha_prior": alpha_prior, "batch_size": fit.batch_size,
                "num_steps": fit.num_steps, "max_steps": fit.max_steps, "learning_rate": fit.learning_rate},
        "gibbs": {"alpha": fit.alpha, "alpha_prior": alpha_prior, "num_chains": gibbs.num_chains,
                  "num_sweeps": gibbs.num_sweeps, "burn_in": gibbs.burn_in, "thin": gibbs.thin,
                  "subsample": gibbs.subsample, "split_merge": gibbs.split_merge},
        # Minibatches of whole images, as `dinodpmm run` fits online EM.
        "online-em": {"alpha": fit.alpha, "num_epochs": fit.online_em.num_epochs, "rate": fit.online_em.rate,
                      "images_per_step": fit.online_em.images_per_step, "batch_size": None,
                      "image_offsets": image_offsets(splits["train"])},
        "sklearn": {"alpha": fit.alpha, "max_iter": fit.sklearn.max_iter, "subsample": fit.sklearn.subsample},
    }
    heldout = np.asarray(splits["threshold"].patches, dtype=np.float32)
    return _Comparison(splits["train"].patches, heldout, merged_options(options), evaluate,
                       plots.backbone_label(backbone.describe()))


def _write_comparison(rows, out_dir: Path, backbone: str) -> list[Path]:
    from .compare import markdown_table, plot_comparison, write_csv

    out_dir.mkdir(parents=True, exist_ok=True)
    markdown_path = out_dir / "comparison.md"
    markdown_path.write_text(markdown_table(rows))
    return [markdown_path, write_csv(rows, out_dir / "comparison.csv"),
            plot_comparison(rows, out_dir / "comparison.png", backbone=backbone)]
