"""Position terms at the rows' own positions: the relative position bias or rotary tables of a later block,
taken at the original positions of the rows that remain after a reduction."""

from __future__ import annotations

from torch import Tensor

from .registry import graph_op


def _index(positions: Tensor, prefix: int, patches_only: bool) -> Tensor:
    """Each row's index ``[B, N']`` along an axis laid out for every token (``patches_only``: for the patches
    alone, after ``prefix`` prefix rows, which stay first); a row with no single position (padding) takes 0."""
    index = positions[..., 0]
    return (index[:, prefix:] - prefix).clamp(min=0) if patches_only else index.clamp(min=0)


@graph_op()
def at_positions(term: Tensor, positions: Tensor, axes: tuple[int, ...], patches_only: bool, prefix: int,
                 rank: int) -> Tensor:
    """``term`` (a tensor laid out per token position along ``axes``: every token, or ``patches_only``) at the
    positions ``positions`` ``[B, N', 1]`` of each image's rows, with the batch axis first and of rank ``rank``
    (the rank of the values it meets): a rotary table ``[N, d]`` becomes ``[B, 1, N', d]``, a bias ``[1, H, N,
    N]`` becomes ``[B, H, N', N']``, and one of each image, ``[B, H, N, N]``, is taken at that image's rows."""
    batch = positions.shape[0]
    index = _index(positions, prefix, patches_only)
    batched = term.dim() == rank and term.shape[0] in (1, batch)  # its first axis is the batch's
    out = term.expand(batch, *term.shape[1:]) if batched else term.unsqueeze(0).expand(batch, *term.shape)
    for axis in axes:
        axis = (axis % term.dim()) + (0 if batched else 1)
        shape = [batch] + [1] * (out.dim() - 1)
        shape[axis] = index.shape[1]
        expanded = list(out.shape)
        expanded[axis] = index.shape[1]
        out = out.gather(axis, index.view(shape).expand(expanded))
    return out.reshape(batch, *([1] * (rank - out.dim())), *out.shape[1:])
