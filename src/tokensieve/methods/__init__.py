"""One file per method: its config, its learnable parts, and score -> select -> reduce."""

from tokensieve.methods.base import AttentionView, Method
from tokensieve.methods.dynamicvit import DynamicViT
from tokensieve.methods.evit import EViT
from tokensieve.methods.madtp import MADTP
from tokensieve.methods.random_drop import RandomDrop
from tokensieve.methods.run import CallInput, MethodRun
from tokensieve.methods.svit import SViT
from tokensieve.methods.tome import ToMe
from tokensieve.methods.topk import TopK
from tokensieve.methods.vltp import VLTP

__all__ = ["MADTP", "VLTP", "AttentionView", "CallInput", "DynamicViT", "EViT", "Method", "MethodRun",
           "RandomDrop", "SViT", "ToMe", "TopK"]
