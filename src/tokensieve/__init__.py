"""tokensieve: token pruning for Vision and Vision-Language Transformers."""

from tokensieve.methods import DynamicViT, EViT, Method, ToMe, TopK
from tokensieve.patch import Sieve, is_patched, patch, sieve_of, trace, unpatch
from tokensieve.tokens import Trace, TokenState

__version__ = "0.1.0"

__all__ = [
    "DynamicViT",
    "EViT",
    "Method",
    "Sieve",
    "ToMe",
    "TokenState",
    "TopK",
    "Trace",
    "is_patched",
    "patch",
    "sieve_of",
    "trace",
    "unpatch",
]
