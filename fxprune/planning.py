"""Plan: a policy checked against an analysed model, one row per block.

The plan is made before any graph is changed: it validates the policy against the model (layer
indices, reducible blocks, class token, blocks that need all tokens downstream) and says what
happens to each block. It is immutable: the tokens entering and leaving every block and the MACs per
block, read from the shape-propagated graphs (dense and rewritten), give a new, measured plan
(:meth:`Plan.measured`), which is what ``fxprune.plan`` returns and the transformed model carries.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
import torch.fx as fx

from .analysis import (
    FROM_ANOTHER_INPUT,
    SCORES,
    Block,
    TokenProgram,
    ancestors,
    bias_per_query,
    final_tokens,
    key_rows,
    module_path,
    op_name,
    pooled_rows,
    token_pooling,
)
from .errors import PolicyError, UnsupportedModelError
from .methods import Method, method_of
from .passes.common import Role, graph_order, rewritten_blocks, stream_node, tag_of
from .passes.restore import layout_restored, restore_point, restores_output
from .policies import Compose, Policy

__all__ = ["Plan", "PlanRow", "make_plan", "block_of", "macs_per_block", "measure_tokens", "token_count"]


@dataclasses.dataclass(frozen=True)
class PlanRow:
    """What happens to one block: its action (and ``policy``, None when left dense) and, once
    measured, the tokens entering and leaving it and its MACs per image, dense and rewritten."""

    index: int
    name: str
    action: str
    policy: Policy | None = None
    tokens_in: int | None = None
    tokens_out: int | None = None
    macs_before: int = 0
    macs_after: int = 0

    @property
    def method(self) -> Method | None:
        """The registered method of the row's policy (None: the block is left dense)."""
        return None if self.policy is None else method_of(self.policy)

    @property
    def removes_tokens(self) -> bool | None:
        """Whether the block leaves fewer tokens than it gets (None: not measured)."""
        if self.tokens_in is None or self.tokens_out is None:
            return None
        return self.tokens_out < self.tokens_in


@dataclasses.dataclass(frozen=True)
class Plan:
    """One row per attention block, plus the MACs outside blocks (patch embedding, head)."""

    model_name: str
    policy: Policy | Compose
    rows: tuple[PlanRow, ...]
    prefix_tokens: int
    input_shape: tuple[int, ...]
    notes: tuple[str, ...] = ()
    other_macs_before: int = 0
    other_macs_after: int = 0

    @property
    def macs_before(self) -> int:
        """Dense MACs per image."""
        return self.other_macs_before + sum(r.macs_before for r in self.rows)

    @property
    def macs_after(self) -> int:
        """MACs per image after the rewrite."""
        return self.other_macs_after + sum(r.macs_after for r in self.rows)

    def measured(
        self, tokens: dict[int, tuple[int | None, int | None]], before: dict[int | None, int],
        after: dict[int | None, int],
    ) -> Plan:
        """This plan with the tokens (in, out) of each block and the MACs per image by block index (key None:
        outside blocks), dense and rewritten."""
        rows = tuple(
            dataclasses.replace(
                row, tokens_in=tokens[row.index][0], tokens_out=tokens[row.index][1],
                macs_before=before.get(row.index, 0), macs_after=after.get(row.index, 0),
            )
            for row in self.rows
        )
        plan = dataclasses.replace(
            self, rows=rows, notes=self.notes + _saving_nothing(rows), other_macs_before=before.get(None, 0),
            other_macs_after=after.get(None, 0),
        )
        return dataclasses.replace(plan, notes=plan.notes + _costing_more(plan))

    def rows_for(self, policy: Policy) -> list[PlanRow]:
        return [r for r in self.rows if r.policy is policy]

    def __str__(self) -> str:
        shape = "×".join(map(str, self.input_shape[1:]))
        lines = [
            f"fxprune plan for {self.model_name} (input {shape}, {self.prefix_tokens} prefix token(s)): "
            f"{self.policy.describe()}",
            f"  {'#':>3}  {'block':<32} {'tokens':>11}  {'MMACs':>15}  action",
        ]
        for r in self.rows:
            tokens = f"{_count(r.tokens_in):>4} → {_count(r.tokens_out):<4}"
            macs = f"{r.macs_before / 1e6:>7.1f} → {r.macs_after / 1e6:<7.1f}"
            lines.append(f"  {r.index:>3}  {r.name:<32} {tokens:>11}  {macs}  {r.action}")
        lines.append(
            f"  {'':>3}  {'(outside blocks)':<32} {'':>11}  "
            f"{self.other_macs_before / 1e6:>7.1f} → {self.other_macs_after / 1e6:<7.1f}"
        )
        ratio = self.macs_before / self.macs_after if self.macs_after else float("nan")
        lines.append(
            f"  MACs per image: {_amount(self.macs_before)} → {_amount(self.macs_after)} ({ratio:.2f}× fewer)"
        )
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def _saving_nothing(rows: Sequence[PlanRow]) -> tuple[str, ...]:
    """A note for each policy rewriting blocks of ``rows`` (measured) that keep every token they get and cost no
    fewer MACs than dense: there its setting changes nothing but adds its own work. Not for a method whose cost
    depends on the image (the rows show its static layout, the most an image keeps)."""
    idle: dict[int, tuple[Policy, list[PlanRow]]] = {}
    for row in rows:
        if (row.policy is not None and not row.method.cost_per_image and row.macs_after >= row.macs_before
                and row.removes_tokens is False):
            idle.setdefault(id(row.policy), (row.policy, []))[1].append(row)
    notes = []
    for policy, chosen in idle.values():
        tokens = ", ".join(dict.fromkeys(str(row.tokens_in) for row in chosen))
        notes.append(f"{policy.describe()} saves nothing at block(s) {', '.join(str(row.index) for row in chosen)} "
                     f"on this input: with {tokens} tokens there its setting leaves every token's work as it is and "
                     f"adds its own (MACs no fewer than dense); reduce more there, or leave those blocks dense")
    return tuple(notes)


def _costing_more(plan: Plan) -> tuple[str, ...]:
    """A note when ``plan`` (measured) removes tokens and costs more MACs per image than the dense model: the
    methods' own work (scoring, matching, clustering) outweighs what they remove. Not for a method whose cost depends
    on the image (the rows show its static layout)."""
    rewritten = [row for row in plan.rows if row.policy is not None]
    removes = any(row.removes_tokens for row in rewritten)  # else _saving_nothing says so
    if plan.macs_after <= plan.macs_before or not removes or any(row.method.cost_per_image for row in rewritten):
        return ()
    return (f"{plan.policy.describe()} costs more MACs than the dense model on this input ({_amount(plan.macs_after)}"
            f" against {_amount(plan.macs_before)}): its own work (scoring, matching, clustering) outweighs what"
            " removing tokens saves; remove more tokens per block, or choose other blocks",)


def _amount(macs: int) -> str:
    """``4.61 G`` or, below a billion, ``23.5 M``."""
    return f"{macs / 1e9:.2f} G" if macs >= 1e9 else f"{macs / 1e6:.1f} M"


def _count(tokens: int | None) -> str:
    return "—" if tokens is None else str(tokens)


def _owner(program: TokenProgram, policy: Policy | Compose) -> dict[int, Policy]:
    owner: dict[int, Policy] = {}
    count = len(program.blocks)
    for part in policy.policies():
        for layer in part.layers:
            if layer >= count:
                raise PolicyError(
                    f"{type(part).__name__}.layers: block {layer} does not exist; {program.model_name} has "
                    f"{count} attention blocks (0–{count - 1})"
                )
            owner[layer] = part
    return owner


ONE_TRANSFORM = "transform the original model with all the policies in one transform (fxprune.Compose)"


def _check_earlier_rewrites(program: TokenProgram, policy: Policy | Compose, earlier: dict[int, set[Role]]) -> None:
    """Refuse a plan for a model an earlier fxprune transform rewrote (its blocks tagged in the graph) where it
    follows the rows to a dense output, or that would rewrite one of those blocks again, a block from one whose
    attention it replaced on (the analysis no longer finds that attention, so it numbers the later blocks otherwise
    than the model), or a block before one of them with a method that tells every later attention the sizes or keep
    policy of the rows (the earlier rewrite's nodes do not pass them on). ``earlier``: the blocks it rewrote
    (:func:`~fxprune.passes.common.rewritten_blocks`)."""
    if not earlier:
        return
    if layout_restored(program.gm):
        raise UnsupportedModelError(
            f"cannot apply {policy.describe()}: an earlier fxprune transform of {program.model_name} follows the rows "
            "its blocks keep to an output that reads every token (it put their original layout back, or returns their "
            f"original positions), which a second transform would not follow; {ONE_TRANSFORM}."
        )
    hidden = _replaced_attention(earlier)
    for part in policy.policies():
        for index in sorted(part.layers):
            if hidden is not None and index >= hidden:
                raise UnsupportedModelError(
                    f"cannot apply {part.describe()} to block {index}: an earlier fxprune transform replaced the "
                    f"attention of block {hidden} with its own (ClusTR's clustered attention), which the analysis does "
                    f"not find again, so the blocks from {hidden} on are not numbered as in the model. Choose blocks "
                    f"before {hidden}, or {ONE_TRANSFORM}."
                )
            if index in earlier:
                raise UnsupportedModelError(
                    f"cannot apply {part.describe()} to block {index} ({program.blocks[index].name}): an earlier "
                    f"fxprune transform rewrote it, and a block takes one method. Choose other layers, or "
                    f"{ONE_TRANSFORM}."
                )
            later = [other for other in sorted(earlier) if other > index]
            if later and method_of(part).weights_later_keys:
                raise UnsupportedModelError(
                    f"{part.describe()} at block {index} tells every later attention the sizes (or the keep policy) "
                    f"of the stream's rows, but an earlier fxprune transform rewrote block {later[0]}, whose nodes do "
                    f"not pass them on. Choose blocks after {later[-1]}, or {ONE_TRANSFORM}."
                )


def _replaced_attention(earlier: dict[int, set[Role]]) -> int | None:
    """The first of the blocks an earlier fxprune transform rewrote, ``earlier`` (with the roles of what it inserted),
    whose attention it replaced with its own (ClusTR's), in the numbering of the model it rewrote, or None."""
    return min((index for index, roles in earlier.items() if Role.ATTENTION in roles), default=None)


def _elsewhere(program: TokenProgram) -> str:
    """The attention the analysis left as is because it runs on another input than the first, said beside a refusal
    of every block (the model's own blocks may be there: a vision tower on a second input)."""
    other = next((text for text in program.unrecognised if f"({FROM_ANOTHER_INPUT} " in text), None)
    return "" if other is None else f" Its attention on another input is left as is: {other}."


def _check_blocks(program: TokenProgram, owner: dict[int, Policy]) -> None:
    """Refuse a block its policy cannot rewrite."""
    for index, part in sorted(owner.items()):
        block, method = program.blocks[index], method_of(part)
        if not block.reducible:
            raise UnsupportedModelError(
                f"cannot apply {part.describe()} to block {index} ({block.name}): {block.refusal}. "
                + ("Choose other layers; fxprune.analyse(model) lists which blocks are reducible."
                   if any(other.reducible for other in program.blocks) else
                   f"No block of {program.model_name} is reducible." + _elsewhere(program))
            )
        if method.needs_class_token and not program.class_token:
            raise UnsupportedModelError(
                f"{part.describe()} reads the class token, but {program.model_name} has no class token"
                + (f" that its output reads (it has {program.prefix_tokens} prefix token(s))" if program.prefix_tokens
                   else "")
                + f": {program.readout}. Use a model whose output reads a class token, or a method that needs none."
            )
        if method.needs_keys and block.attention.k is None:
            raise UnsupportedModelError(
                f"{part.describe()} works on the attention keys, but the keys of block {index} "
                f"({block.name}) were not found in its attention ({block.attention.kind} at "
                f"{block.attention.node.name}). Choose other layers."
            )
        if method.refuse is not None and (refusal := method.refuse(part, block)) is not None:
            raise UnsupportedModelError(
                f"cannot apply {part.describe()} to block {index} ({block.name}): {refusal}. Choose other layers."
            )


def _check_model(program: TokenProgram, owner: dict[int, Policy], restore: bool) -> None:
    """Refuse a plan the model's blocks or output cannot take as a whole (``restore`` as :func:`make_plan` takes
    it: a pool over the restored layout reads every original token once, no padding)."""
    padding = next((part for part in owner.values() if method_of(part).pads_tokens), None)
    restored = restore and restores_output(program)
    if padding is not None and not restored and (pooling := _token_pooling(program)) is not None:
        raise UnsupportedModelError(
            f"{padding.describe()} keeps a different number of tokens per image and pads the batch, but "
            f"{program.model_name} pools over all tokens after its last block ({pooling}), which would "
            "take the padding in (fxprune weights a mean over the rows of the final tokens by their sizes, not other "
            "pools). Use a model that reads its class token or mean-pools, or EViT, Top-K or ToMe."
        )
    weighting = sorted((index, part) for index, part in owner.items() if method_of(part).weights_later_keys)
    if weighting:
        first, part = weighting[0]
        for block in program.blocks[first + 1:]:
            if block.attention.keys != block.tokens and (block.tokens or key_rows(program, block) is None):
                rows = f"the {block.tokens} rows of the stream" if block.tokens else "rows of the final tokens"
                raise UnsupportedModelError(
                    f"{part.describe()} tells every later attention the sizes (or the keep policy) of the stream's "
                    f"rows, but block {block.index} ({block.name}) attends over {block.attention.keys} keys, not "
                    f"{rows} (e.g. a class token joined later, as in CaiT). Use EViT, Top-K or another method that "
                    "carries nothing to later blocks."
                )
    masking = sorted((index, part) for index, part in owner.items() if method_of(part).masks_in_training)
    later = sorted((index, part) for index, part in owner.items() if masking and index > masking[0][0]
                   and part is not masking[0][1]
                   and (method_of(part).reduces_tokens or not method_of(part).keeps_attention))
    if later:
        (first, part), (index, other) = masking[0], later[0]
        what = "remove rows" if method_of(other).reduces_tokens else "replace its attention"
        raise UnsupportedModelError(
            f"{part.describe()} at block {first} keeps every row in its training graph and masks the dropped ones "
            f"with a keep policy that every later attention reads, so block {index} ({program.blocks[index].name}) "
            f"cannot {what} with {other.describe()} under it. Put {part.describe()}'s blocks after the other "
            "methods' that remove rows or replace the attention."
        )
    reducing = [index for index, part in owner.items() if method_of(part).reduces_tokens]
    if reducing:
        first = min(reducing)
        for block in program.blocks[first:]:
            if block.needs_all_tokens:
                raise UnsupportedModelError(
                    f"block {block.index} ({block.name}) needs every token: {block.refusal}. Reducing tokens at "
                    f"block {first} would break it; only blocks after {block.index} can be reduced."
                )


def _token_pooling(program: TokenProgram) -> str | None:
    """What pools over the token axis after the last block (a reduction over dim 1 of a ``[B, N, C]`` value) and
    cannot be told the sizes of the rows, if anything."""
    node = token_pooling(program)
    if node is None or pooled_rows(program, node) is not None:
        return None
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    return f"{op_name(node)} over dim {dim} at {node.name} in {module_path(node) or 'the top-level forward'}"


def _depth(program: TokenProgram) -> int:
    """The blocks that defaults such as "every block" cover: up to the last one of self-attention (an attention
    pool or class-attention blocks after it are not token blocks)."""
    self_attention = [b.index for b in program.blocks if b.attention.queries == b.attention.keys]
    return self_attention[-1] + 1 if self_attention else len(program.blocks)


DENSE_OUTPUT = "the output reads every patch row (a dense output)"
ORDERED_OUTPUT = "the output reads every patch row in its place (convolutions over their grid)"


def _check_restore(program: TokenProgram, reducing: Sequence[int], restore: bool) -> None:
    """Refuse ``restore=False`` where the reduced rows would reach a part of the model that reads the tokens in
    their places: their grid, or intermediate blocks' tokens read apart from the stream."""
    if restore or not reducing:
        return
    reads = []
    if program.reads_apart:
        readers = ", ".join(module_path(reader) or reader.name for _, reader in program.reads_apart)
        reads.append(f"{_read_apart(program)} apart from the stream (at {readers})")
    if program.readout.patches == "ordered":
        reads.append("the final tokens in their places (convolutions over their grid)")
    if reads:
        raise PolicyError(
            f"restore=False returns the reduced rows as they are, but {program.model_name} reads "
            f"{' and '.join(reads)}, which needs the original token layout: leave restore=True"
        )


def _check_parallel_end(program: TokenProgram, reducing: Sequence[int]) -> None:
    """Refuse a reduction at a parallel block whose output is the final tokens that the model's output reads in their
    places: both its branches run on every token, and the layout would be put back right after it."""
    if program.readout.patches not in ("dense", "ordered"):
        return
    ends = {final_tokens(program), restore_point(program)}
    for index in reducing:
        block = program.blocks[index]
        if block.parallel is not None and block.mid in ends:
            raise UnsupportedModelError(
                f"block {index} ({block.name}) is a parallel block whose output is the final tokens, which "
                f"{program.model_name}'s output reads in their places: both its branches run on every token, so a "
                "reduction there would be undone at once and save nothing. Choose earlier blocks."
            )


def _read_apart(program: TokenProgram) -> str:
    """Which tokens the output reads apart from the stream, in words: "the tokens after the embeddings and blocks
    1, 2" (each read value's block: the last whose residual add after its attention, or after both branches of a
    parallel block, is it or comes before it)."""
    order = graph_order(program.gm)
    after = {max((b.index for b in program.blocks if b.mid is not None and order(b.mid) <= order(value)), default=None)
             for value, _ in program.reads_apart}
    named = [str(index) for index in sorted(index for index in after if index is not None)]
    parts = (["the embeddings"] if None in after else []) + (
        [f"block{'s' if len(named) > 1 else ''} {', '.join(named)}"] if named else [])
    return "the tokens after " + " and ".join(parts)


def _layout_notes(program: TokenProgram, restore: bool) -> list[str]:
    """What a plan that reduces tokens says of the token layout the output reads."""
    notes = []
    if restores_output(program):
        reads = DENSE_OUTPUT if program.readout.patches == "dense" else ORDERED_OUTPUT
        notes.append(f"{reads}: the original token layout is put back after the last block (a kept or merged token "
                     "takes the row that holds it, a dropped one its state where its block dropped it; "
                     "docs/methods.md)" if restore else
                     f"{reads}: with restore=False it returns the reduced rows, in the order the methods leave them, "
                     "and each row's original position beside the output")
    if program.reads_apart:
        notes.append(f"the output also reads {_read_apart(program)} apart from the stream (a dense-prediction "
                     "neck, intermediate features): each read gets the original token layout as it is there")
    return notes


def make_plan(program: TokenProgram, policy: Policy | Compose, restore: bool = True) -> Plan:
    """Validate ``policy`` against ``program`` and give each block its action (tokens and MACs come later);
    ``restore`` as :func:`fxprune.transform` takes it, for what the plan says of a dense output."""
    if not isinstance(policy, (Policy, Compose)):
        hint = ""
        if isinstance(policy, str):
            hint = f": a policy's text, as the command line takes it, is read by fxprune.parse_policy({policy!r})"
        elif isinstance(policy, (list, tuple)) and policy and all(isinstance(part, Policy) for part in policy):
            hint = ": several policies, each on its own blocks, are one fxprune.Compose([...])"
        raise PolicyError(f"expected an fxprune policy (e.g. fxprune.EViT(0.7, (3, 6, 9))), got {policy!r}{hint}")
    policy = policy.bind(_depth(program), program.tokens - program.prefix_tokens)
    earlier = rewritten_blocks(program.gm)
    _check_earlier_rewrites(program, policy, earlier)
    owner = _owner(program, policy)
    _check_blocks(program, owner)
    _check_model(program, owner, restore)
    reducing = [index for index, part in owner.items() if method_of(part).reduces_tokens]
    _check_restore(program, reducing, restore)
    _check_parallel_end(program, reducing)
    rows = []
    for block in program.blocks:
        part = owner.get(block.index)
        if part is not None:
            action = part.action(block.index)
        elif stream_node(program.gm, block.index) is not None:
            action = "unchanged (reduced by an earlier fxprune transform)"
        elif block.reducible:
            action = "dense"
        else:
            action = f"dense (not reducible: {block.refusal})"
        rows.append(PlanRow(block.index, block.name, action, part))
    shape = tuple(program.gm.graph.find_nodes(op="placeholder")[0].meta["val"].shape)
    notes = [f"not recognised as attention, left as is: {u}" for u in program.unrecognised]
    if (hidden := _replaced_attention(earlier)) is not None:
        notes.append(f"block {hidden} is not listed: an earlier fxprune transform replaced its attention (ClusTR's "
                     f"clustered attention), which the analysis does not find again; its MACs count outside the "
                     f"blocks, and the blocks after it are numbered from {hidden}")
    notes += [f"kept as a leaf during capture: {name} ({why})" for name, why in program.trace.leaves]
    notes += [note for part in policy.policies() for note in part.plan_notes()]
    notes += [f"{part.describe()} scores tokens by {SCORES[program.class_token]}"
              + ("" if program.class_token else f" (no class token: {program.readout})")
              for part in policy.policies() if method_of(part).scores_tokens]
    parallel = [program.blocks[index] for index in reducing if program.blocks[index].parallel is not None]
    if parallel:
        notes.append(f"block(s) {', '.join(str(b.index) for b in parallel)} run a branch beside their attention "
                     f"({parallel[0].beside}{', …' if len(parallel) > 1 else ''}: parallel blocks): their tokens are "
                     "reduced after both branches, which run on every token")
    placed = [b.index for b in program.blocks[min(reducing) + 1:] if b.position_terms] if reducing else []
    if placed:
        notes.append(f"block(s) {', '.join(map(str, placed))} read position terms (relative position bias, rotary "
                     "tables): each takes them at its remaining rows' original positions")
        merging = [part.describe() for part in policy.policies()
                   if (merges := method_of(part).merges_rows) is not None and merges(part)]
        if merging:
            notes.append(f"{', '.join(merging)}: a row that stands for several patches takes one patch's position "
                         "(a ToMe merge its destination's, EViT's fused token its highest-scoring dropped token's; "
                         "docs/methods.md)")
    biased = {part.describe(): [i for i, owned in owner.items() if owned is part
                                and bias_per_query(program.blocks[i].attention)]
              for part in policy.policies() if method_of(part).needs_keys and not method_of(part).reduces_tokens}
    notes += [f"{name} at block(s) {', '.join(map(str, blocks))}: the attention has a bias per query and key "
              "(a relative position bias); each query's bias to a cluster is log Σ exp of its members' biases "
              "(docs/methods.md)" for name, blocks in biased.items() if blocks]
    if reducing:
        notes += _layout_notes(program, restore)
    return Plan(program.model_name, policy, tuple(rows), program.prefix_tokens, shape, tuple(notes))


def block_of(node: fx.Node, blocks: Sequence[Block]) -> int | None:
    """Index of the block whose module contains ``node`` (inserted nodes carry theirs), or None."""
    tag = tag_of(node)
    if tag is not None:
        return tag.block
    path = module_path(node)
    for block in blocks:
        if path == block.name or path.startswith(block.name + "."):
            return block.index
    return None


def token_count(value: object) -> int | None:
    """N of a ``[B, N, C]`` tensor (or of the first of a tuple, as ToMe's merge returns), else None."""
    if isinstance(value, tuple) and value:
        value = value[0]
    return value.shape[1] if isinstance(value, torch.Tensor) and value.dim() == 3 else None


def _tokens(node: fx.Node) -> int | None:
    return token_count(node.meta.get("val"))


def measure_tokens(program: TokenProgram, plan: Plan) -> dict[int, tuple[int | None, int | None]]:
    """The tokens entering and leaving each block of ``plan``, read from the rewritten graph's example values."""
    entering = [_tokens(block.input) for block in program.blocks]
    tokens = {}
    for row in plan.rows:
        stream = stream_node(program.gm, row.index) if row.policy is not None else None
        if stream is not None:
            out = _tokens(stream)
        elif row.index + 1 < len(entering):
            out = entering[row.index + 1]
        else:
            out = entering[row.index]
        tokens[row.index] = (entering[row.index], out)
    return tokens


def macs_per_block(gm: fx.GraphModule, blocks: Sequence[Block], batch: int) -> dict[int | None, int]:
    """MACs per image of each block (key None: outside blocks) from the recorded ``meta['macs']`` of the nodes the
    output is computed from (not of dead code, which the returned graph drops)."""
    totals: dict[int | None, int] = {}
    live = ancestors(gm.graph.find_nodes(op="output"))
    for node in gm.graph.nodes:
        if node not in live:
            continue
        key = block_of(node, blocks)
        totals[key] = totals.get(key, 0) + node.meta.get("macs", 0)
    return {key: round(value / batch) for key, value in totals.items()}
