"""fxprune: token reduction for Vision Transformers by rewriting their torch.fx graph."""

import importlib

from . import methods
from .analysis import TokenProgram, analyse
from .capture import trace
from .errors import FxPruneError, PolicyError, TraceError, UnsupportedModelError
from .flops import flops
from .lower import lower
from .methods.ats import ATS
from .methods.clustr import ClusTR
from .methods.evit import EViT, TopK
from .methods.tome import ToMe
from .planning import Plan
from .policies import Compose, Policy, parse_policy
from .report import Report, report
from .transform import plan, transform

__all__ = [
    "transform", "trace", "analyse", "plan", "flops", "lower", "report", "Report",
    "EViT", "TopK", "ToMe", "ATS", "ClusTR", "Compose", "Policy", "parse_policy", "Plan", "TokenProgram",
    "FxPruneError", "TraceError", "UnsupportedModelError", "PolicyError", "methods",
]

# second-tier modules, imported on first use: ``import fxprune; fxprune.models.digits_vit()`` works
_SUBMODULES = ("bench", "cli", "datasets", "demo", "models", "ops", "passes", "show", "speed")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fxprune' has no attribute {name!r}")
