"""tokensieve: token pruning for Vision and Vision-Language Transformers."""

from tokensieve.bench import BenchResult, benchmark
from tokensieve.calibration import Calibration, calibrate
from tokensieve.calls import prepacked
from tokensieve.flops import FlopsReport, flops, tower_flops
from tokensieve.methods import (
    MADTP,
    VLTP,
    CallInput,
    DynamicViT,
    EViT,
    Method,
    MethodRun,
    RandomDrop,
    SViT,
    ToMe,
    TopK,
)
from tokensieve.patch import Sieve, inputs, is_patched, patch, pruning_disabled, sieve_of, trace, unpatch
from tokensieve.temperature_calibration import BudgetOutOfReach, TemperatureCalibration, calibrate_temperature
from tokensieve.tokens import TokenState, Trace

__version__ = "0.1.0"

__all__ = [
    "MADTP",
    "VLTP",
    "BenchResult",
    "BudgetOutOfReach",
    "Calibration",
    "CallInput",
    "DynamicViT",
    "EViT",
    "FlopsReport",
    "Method",
    "MethodRun",
    "RandomDrop",
    "SViT",
    "Sieve",
    "TemperatureCalibration",
    "ToMe",
    "TokenState",
    "TopK",
    "Trace",
    "benchmark",
    "calibrate",
    "calibrate_temperature",
    "flops",
    "inputs",
    "is_patched",
    "patch",
    "prepacked",
    "pruning_disabled",
    "sieve_of",
    "tower_flops",
    "trace",
    "unpatch",
]
