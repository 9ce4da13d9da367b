"""The ``embed`` and ``cache`` subcommands of the ``dinodpmm`` command line.

:func:`register` adds them to an argparse subparsers object. Each parsed namespace
carries its handler in ``args.handler``, a function ``(args) -> int`` that returns the
exit code. Handlers print results to stdout. A user error (missing folder, invalid
layout, unknown backbone) prints one line to stderr and returns 2, the status argparse
uses for usage errors, instead of raising.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .cache import STORAGE_DTYPES, EmbeddingCache
from .datasets import LAYOUTS, SPLITS, open_dataset

logger = logging.getLogger(__name__)

# Exit code of a handler that rejected its input.
EXIT_USER_ERROR = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``embed`` and ``cache`` subcommands to ``subparsers``."""
    _register_embed(subparsers)
    _register_cache(subparsers)


def _positive_int(text: str) -> int:
    """Parse a command-line value that must be an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_cache_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache",
        metavar="DIR",
        default=None,
        help="embedding cache root (default: $DINODPMM_CACHE, else the user cache directory)",
    )


def _register_embed(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "embed",
        help="compute and cache the patch embeddings of a dataset",
        description="Compute the patch embeddings of every image of a dataset, store them "
        "in the embedding cache and assemble one patch matrix per split. Images already "
        "in the cache are not recomputed.",
    )
    parser.add_argument("data_root", metavar="DATA_ROOT", help="dataset root folder")
    parser.add_argument("--backbone", required=True, metavar="NAME", help="backbone name, e.g. dinov2_vits14")
    parser.add_argument("--weights", metavar="PATH", default=None, help="local weights file of the backbone")
    _add_cache_argument(parser)
    parser.add_argument(
        "--layout", choices=LAYOUTS, default=None, help="dataset layout (default: detected from the folders)"
    )
    parser.add_argument(
        "--resolution", type=_positive_int, default=448, metavar="N", help="input resolution in pixels (default: 448)"
    )
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=16, metavar="N", help="images per backbone call (default: 16)"
    )
    parser.add_argument(
        "--splits", nargs="+", choices=SPLITS, default=list(SPLITS), help="splits to embed (default: all present)"
    )
    parser.add_argument(
        "--dtype", choices=STORAGE_DTYPES, default="float16", help="storage dtype of the cache (default: float16)"
    )
    parser.set_defaults(handler=run_embed)


def _register_cache(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "cache", help="inspect or clear the embedding cache",
        description="`cache info` lists the backbones, entries and size of the embedding cache; `cache clear` "
                    "deletes all of it or one backbone's entries. The cache lives in --cache, else "
                    "$DINODPMM_CACHE, else the user cache folder (~/.cache/dinodpmm/embeddings on Linux).",
    )
    actions = parser.add_subparsers(dest="cache_action", metavar="ACTION", required=True)
    info = actions.add_parser("info", help="print the size, entries and backbones of the cache")
    _add_cache_argument(info)
    info.set_defaults(handler=run_cache_info)
    clear = actions.add_parser("clear", help="delete cached embeddings")
    clear.add_argument("--backbone", metavar="NAME", default=None, help="delete only this backbone's entries")
    _add_cache_argument(clear)
    clear.set_defaults(handler=run_cache_clear)


def _report_user_error(command: str, error: Exception) -> int:
    print(f"dinodpmm {command}: error: {error}", file=sys.stderr)
    return EXIT_USER_ERROR


def _load_backbone(args: argparse.Namespace):
    # Imported here so that `cache info` and `--help` do not import the model code.
    from .backbones import load_backbone

    # embed_split shows the progress bar and already batches the images.
    return load_backbone(
        args.backbone,
        weights=args.weights,
        device=args.device,
        resolution=args.resolution,
        batch_size=args.batch_size,
        progress=False,
    )


def run_embed(args: argparse.Namespace) -> int:
    """Embed the requested splits of ``args.data_root`` and print one line per split."""
    from .extract import embed_split

    try:
        dataset = open_dataset(args.data_root, args.layout)
        cache = EmbeddingCache(args.cache, dtype=args.dtype)
        backbone = _load_backbone(args)
    except (OSError, ValueError, KeyError) as error:
        return _report_user_error("embed", error)

    logger.info("%s", dataset.summary())
    for name in dict.fromkeys(args.splits):
        split = dataset.splits.get(name)
        if split is None:
            logger.warning("skipping the %s split: the %s dataset at %s has none", name, dataset.layout, dataset.root)
            continue
        try:
            embeddings = embed_split(backbone, split, cache, batch_size=args.batch_size, description=name)
        except (OSError, ValueError) as error:
            return _report_user_error("embed", error)
        counts = split.counts
        print(
            f"{name}: {len(split)} images ({counts['normal']} normal, {counts['anomalous']} anomalous), "
            f"{embeddings.num_patches} patches x {embeddings.dim} {embeddings.patches.dtype} in {embeddings.path}"
        )
    return 0


def _format_bytes(num_bytes: int) -> str:
    if num_bytes < 1024:
        return f"{num_bytes} B"
    size = num_bytes / 1024
    for unit in ("KiB", "MiB", "GiB"):
        if size < 1024:
            break
        size /= 1024
    else:
        unit = "TiB"
    return f"{size:.1f} {unit} ({num_bytes} bytes)"


def run_cache_info(args: argparse.Namespace) -> int:
    """Print the root, size, entry counts per backbone and bundle count of the cache."""
    try:
        info = EmbeddingCache(args.cache).info()
    except OSError as error:
        return _report_user_error("cache info", error)
    print(f"root: {info.root}")
    print(f"size: {_format_bytes(info.total_bytes)}")
    print(f"entries: {info.num_entries}")
    print(f"bundles: {info.num_bundles}")
    if info.num_temporary_files:
        print(f"temporary files left by interrupted runs: {info.num_temporary_files}")
    for backbone, count in info.entries_per_backbone.items():
        print(f"  {backbone}: {count} entries")
    return 0


def run_cache_clear(args: argparse.Namespace) -> int:
    """Delete the entries of one backbone or of all backbones and print how many."""
    try:
        cache = EmbeddingCache(args.cache)
    except OSError as error:
        return _report_user_error("cache clear", error)
    if args.cache is not None and not cache.root.is_dir():
        error = FileNotFoundError(f"cache directory {args.cache} not found; pass the --cache given to `dinodpmm embed`")
        return _report_user_error("cache clear", error)
    try:
        removed = cache.clear(args.backbone)
    except (OSError, ValueError) as error:
        return _report_user_error("cache clear", error)
    scope = f"backbone {args.backbone}" if args.backbone else "all backbones"
    print(f"deleted {removed} entries of {scope} from {cache.root}")
    if args.backbone and removed == 0:
        cached = ", ".join(cache.info().entries_per_backbone) or "none"
        print(f"no entries of backbone {args.backbone} were cached; cached backbones: {cached}")
    return 0

