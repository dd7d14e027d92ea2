"""tokensieve: token pruning for Vision and Vision-Language Transformers."""

from tokensieve.bench import BenchResult, benchmark
from tokensieve.flops import FlopsReport, flops
from tokensieve.methods import DynamicViT, EViT, Method, RandomDrop, ToMe, TopK
from tokensieve.patch import Sieve, is_patched, patch, pruning_disabled, sieve_of, trace, unpatch
from tokensieve.tokens import TokenState, Trace

__version__ = "0.1.0"

__all__ = [
    "BenchResult",
    "DynamicViT",
    "EViT",
    "FlopsReport",
    "Method",
    "RandomDrop",
    "Sieve",
    "ToMe",
    "TokenState",
    "TopK",
    "Trace",
    "benchmark",
    "flops",
    "is_patched",
    "patch",
    "pruning_disabled",
    "sieve_of",
    "trace",
    "unpatch",
]
