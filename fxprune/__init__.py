"""fxprune: token reduction for Vision Transformers by rewriting their torch.fx graph.

The compiler stages are modules of this package (capture → analysis → planning → methods and passes → verify →
lowering); the tooling (bench, speed, datasets, models, show, demo, cli) is in :mod:`fxprune.tools`, and each
tool module is also reachable as ``fxprune.<name>`` (``from fxprune.datasets import DigitScenes``).
"""

import importlib
import importlib.abc
import importlib.util
import sys

from . import methods
from .analysis import AttentionSite, Block, TokenProgram, analyse
from .capture import TraceInfo, trace
from .counting import flops
from .errors import (
    CapturedArgumentError,
    CapturedShapeError,
    FxPruneError,
    PolicyError,
    TraceError,
    UnsupportedModelError,
)
from .exporting import ExportError, export
from .lowering import LoweredModule, lower
from .methods.adavit import AdaViT
from .methods.ats import ATS
from .methods.clustr import ClusTR
from .methods.dynamicvit import DynamicViT
from .methods.evit import EViT, TopK
from .methods.random_keep import RandomKeep
from .methods.stride import Stride
from .methods.tome import ToMe
from .ops.emitting import collect
from .passes.learned import TrainEvalGraphModule, save_weights
from .pipeline import plan, transform
from .planning import Plan, PlanRow
from .policies import Compose, Policy, parse_policy
from .reporting import Report, report
from .tools.train import TrainConfig, train

__all__ = [
    "transform", "trace", "analyse", "plan", "flops", "lower", "report", "Report",
    "EViT", "TopK", "ToMe", "ATS", "ClusTR", "Stride", "RandomKeep", "DynamicViT", "AdaViT", "Compose", "Policy",
    "parse_policy", "Plan", "TokenProgram",
    "collect", "save_weights", "methods", "train", "TrainConfig",
    "PlanRow", "Block", "AttentionSite", "TraceInfo", "LoweredModule", "TrainEvalGraphModule",
    "FxPruneError", "TraceError", "UnsupportedModelError", "PolicyError", "CapturedShapeError", "CapturedArgumentError",
    "export", "ExportError",
]

_TOOLS = ("bench", "cli", "datasets", "demo", "models", "show", "speed")


class _ToolAlias(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Makes ``import fxprune.<tool>`` give the module ``fxprune.tools.<tool>`` itself."""

    def find_spec(self, fullname, path=None, target=None):
        package, _, name = fullname.partition(".")
        if package == __name__ and name in _TOOLS:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return importlib.import_module(f"{__name__}.tools.{spec.name.partition('.')[2]}")

    def exec_module(self, module):
        pass


sys.meta_path.append(_ToolAlias())


def __getattr__(name: str):
    """``fxprune.models``, ``fxprune.datasets``, … (and ``fxprune.losses``, ``fxprune.ops``, ``fxprune.passes``) on
    first use."""
    if name in _TOOLS:
        return importlib.import_module(f".tools.{name}", __name__)
    if name in ("losses", "ops", "passes", "tools"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
