"""jaxpost: post-training (SFT, reward modeling, DPO) for decoder-only language models in JAX.

Nothing here runs at import time. The loss library (`jaxpost.losses`) depends on jax alone.
"""

__version__ = "0.1.0"
