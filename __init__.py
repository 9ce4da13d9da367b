"""Unsupervised anomaly detection with a Dirichlet process mixture over DINOv2 patch embeddings.

Subpackages, in the order data flows through them:

- :mod:`dinodpmm.features`: backbones, preprocessing, dataset layouts and the embedding cache.
- :mod:`dinodpmm.models`: the Pyro generative model (stick-breaking prior, component families).
- :mod:`dinodpmm.inference`: SVI, collapsed Gibbs and online EM, all returning a
  :class:`~dinodpmm.inference.Posterior`.
- :mod:`dinodpmm.experiments`: scoring, metrics, the experiment runner, plots and the CLI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("dinodpmm")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
