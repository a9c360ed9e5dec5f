"""fxprune: token reduction for Vision Transformers by rewriting their torch.fx graph."""

from .analysis import TokenProgram, analyse
from .capture import trace
from .errors import FxPruneError, PolicyError, TraceError, UnsupportedModelError
from .flops import flops
from .lower import lower
from .plan import Plan
from .policies import ATS, ClusTR, Compose, EViT, Policy, ToMe, TopK, parse_policy
from .report import Report, report
from .transform import plan, transform

__all__ = [
    "transform", "trace", "analyse", "plan", "flops", "lower", "report", "Report",
    "EViT", "TopK", "ToMe", "ATS", "ClusTR", "Compose", "Policy", "parse_policy", "Plan", "TokenProgram",
    "FxPruneError", "TraceError", "UnsupportedModelError", "PolicyError",
]
