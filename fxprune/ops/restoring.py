"""The original token layout of a reduced stream, for a model whose output is every token (a dense output).

Every stream function sends each of its input rows to at most one output row that holds it (kept, or merged
into it) or to none (dropped): its *destinations* ``[B, N_in]`` (:data:`~fxprune.ops.ROWS`, declared with each
built-in stream function; for another, the output row with its largest weight in the function's result on the
identity over its input rows, :func:`heaviest_rows`). Following the destinations block by block gives, for each
original token, the row that holds it now (:func:`follow_rows`), or none once dropped. A dropped token keeps the
state it had when it was dropped (:func:`token_states`, which after the last block also puts the original layout
back: every original token gets the row that holds it, or its recorded state).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .registry import graph_op
from .selection import gather_tokens


@graph_op()
def row_identity(x: Tensor) -> Tensor:
    """The identity over the rows of ``x`` ``[B, N, C]``: ``[B, N, N]`` in ``x``'s dtype, to be passed through a
    stream function in place of the tokens (its output is that function's row map)."""
    return torch.eye(x.shape[1], dtype=x.dtype, device=x.device).expand(x.shape[0], -1, -1)


@graph_op()
def first_rows(x: Tensor) -> Tensor:
    """Where each original token is in ``x`` ``[B, N, C]``, the model's first stream: its own row, ``[B, N]``."""
    return torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)


@graph_op()
def heaviest_rows(row_map: Tensor) -> Tensor:
    """The destinations ``[B, N_in]`` of a stream function from its row map ``[B, N_out, N_in]`` (its result on
    the identity over its input rows): each input row's output row with its largest weight (the first on a tie);
    −1 for a row with no weight anywhere (dropped)."""
    weight, target = row_map.max(dim=1)
    return torch.where(weight > 0, target, -1)


@graph_op()
def follow_rows(rows: Tensor, destinations: Tensor) -> Tensor:
    """The row ``[B, N0]`` that holds each original token after a stream function that sends its input rows to
    ``destinations`` ``[B, N_in]`` (−1: dropped), given the row ``rows`` ``[B, N0]`` that held it before (−1:
    dropped)."""
    moved = destinations.gather(1, rows.clamp(min=0))
    return torch.where(rows >= 0, moved, -1)


@graph_op()
def token_states(recorded: Tensor | None, x: Tensor, rows: Tensor) -> Tensor:
    """Each original token's latest state ``[B, N0, C]``: its row of ``x`` ``[B, N, C]`` where ``rows`` ``[B, N0]``
    has one, else what ``recorded`` held (None: the tokens of ``x`` are every original token, in order)."""
    if recorded is None:
        return x
    taken = gather_tokens(x, rows.clamp(min=0))
    return torch.where((rows >= 0).unsqueeze(-1), taken, recorded)


@graph_op()
def pad_reduced_rows(x: Tensor, positions: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """The reduced rows ``x`` ``[B, K, C]`` and their original positions ``[B, K]`` (−1: padding) on ``width``
    rows, the layout's static count (what a compiled or exported graph has), padding rows zero with position −1:
    ``([B, width, C], [B, width])``. Eager graphs pad a batch only to its largest count; this makes the output's
    shape independent of the batch and of the mode."""
    missing = width - x.shape[1]
    if missing > 0:
        x = torch.cat([x, x.new_zeros(x.shape[0], missing, *x.shape[2:])], dim=1)
        positions = torch.cat([positions, positions.new_full((positions.shape[0], missing), -1)], dim=1)
    return x.masked_fill((positions < 0)[..., None], 0), positions
