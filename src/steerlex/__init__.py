"""steerlex: explain SAE features with mutual-information word lists and steer LLMs with them.

Method: Wu et al., "Interpreting and Steering LLMs with Mutual Information-based
Explanations on Sparse Autoencoders", arXiv 2502.15576.
"""

from steerlex.core.errors import SteerlexError

__version__ = "0.1.0"

__all__ = ["SteerlexError", "__version__"]
