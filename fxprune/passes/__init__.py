"""Graph rewrites, one per method. A pass is ``(GraphModule, TokenProgram, Plan, policy) -> GraphModule``."""

from __future__ import annotations

from collections.abc import Callable

import torch.fx as fx

from ..analysis import TokenProgram
from ..plan import Plan
from ..policies import ATS, ClusTR, EViT, Policy, ToMe, TopK
from .ats import ats_pass
from .clustr import clustr_pass
from .evit import evit_pass
from .tome import thread_sizes, tome_pass

Pass = Callable[[fx.GraphModule, TokenProgram, Plan, Policy], fx.GraphModule]

PASSES: dict[type[Policy], Pass] = {
    EViT: evit_pass, TopK: evit_pass, ToMe: tome_pass, ATS: ats_pass, ClusTR: clustr_pass
}


def apply_passes(gm: fx.GraphModule, program: TokenProgram, plan: Plan) -> fx.GraphModule:
    """Run the pass of every policy in ``plan`` on ``gm`` (the program's graph module)."""
    for policy in plan.policy.policies():
        gm = PASSES[type(policy)](gm, program, plan, policy)
    if any(isinstance(policy, (ToMe, ATS)) for policy in plan.policy.policies()):
        gm = thread_sizes(gm, program, plan)
    gm.graph.lint()
    gm.recompile()
    return gm
