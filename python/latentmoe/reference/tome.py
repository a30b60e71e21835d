"""Reference token merging (ToMe) and unmerging ("token inflation").

Every matching function returns a :class:`MergePlan` of explicit int64 index tensors, so a kernel can
be checked index for index, not just value for value. The plan is then applied with :func:`merge_tokens`
(size-weighted average) and undone with :func:`unmerge_tokens`.

Conventions used throughout (B batch, N input tokens, r merged-away tokens, M = N - r output slots):

* A token is either *source* (set A) or *destination* (set B). Each A token finds its most similar
  B token (cosine similarity of ``metric``); the r A tokens with the most similar best match are
  merged into their match. Several A tokens may merge into one B token. B tokens always survive.
* Ties are broken deterministically: an A token's best match is the lowest-index B token among
  equals, and among A tokens with equal best scores the lower index is merged first.
* Protected tokens (e.g. CLS) never merge: a protected A token is never a source and a protected
  B token never receives a source, so its value and size pass through unchanged.
* A zero metric vector has similarity 0 to everything (it is normalised with a 1e-12 floor, as
  ``torch.nn.functional.normalize`` does).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Layout = Literal["sorted", "tome"]


class MergePlan(NamedTuple):
    """Index tensors describing one merge of ``N`` tokens into ``M = N - r`` slots (all int64).

    Attributes:
        dest: ``[B, N]``, values in ``[0, M)``. Output slot of every input token: merge reduces
            token ``i`` into slot ``dest[b, i]``; unmerge copies slot ``dest[b, i]`` back to ``i``.
        origin: ``[B, M]``. Original position of the surviving token that owns each slot (an
            unmerged A token or a B token). With ``layout="sorted"`` it is strictly increasing.
        src_idx: ``[B, r]``. Original positions of the merged-away A tokens, most similar first.
        dst_idx: ``[B, r]``. Original position of the B token that ``src_idx[b, j]`` merged into.
    """

    dest: torch.Tensor
    origin: torch.Tensor
    src_idx: torch.Tensor
    dst_idx: torch.Tensor

    @property
    def num_removed(self) -> int:
        """r, the number of tokens merged away (after clamping to what could merge)."""
        return self.src_idx.shape[1]

    @property
    def num_out(self) -> int:
        """M, the number of tokens after merging."""
        return self.origin.shape[1]


# ----------------------------------------------------------------------------------------------
# Partitions into A (source) and B (destination)
# ----------------------------------------------------------------------------------------------


def alternate_partition(num_tokens: int, device: torch.device | str | None = None) -> torch.Tensor:
    """ToMe's alternating split: even positions are A (sources), odd positions are B (destinations).

    Returns ``is_dst``: bool ``[num_tokens]``, True for B tokens.
    """
    return torch.arange(num_tokens, device=device) % 2 == 1


def random2d_partition(
    h: int,
    w: int,
    sx: int,
    sy: int,
    *,
    no_rand: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """tomesd's strided 2-D split of an ``h x w`` token grid (tokens in row-major order).

    The top-left ``(h // sy) * sy`` by ``(w // sx) * sx`` region is cut into ``sy x sx`` cells and
    exactly one token per cell becomes a destination (B): the cell's top-left token if ``no_rand``,
    else the cell-local index ``k`` (row-major in the cell, ``dy, dx = divmod(k, sx)``) drawn as
    ``torch.randint(sy * sx, (h // sy, w // sx), generator=generator)`` on the generator's device
    (the default CPU generator if None), one draw per cell in row-major cell order. Tokens outside
    that region (ragged right/bottom edges) are all sources (A).

    Returns ``is_dst``: bool ``[h * w]``.
    """
    if sx < 1 or sy < 1:
        raise ValueError(f"random2d_partition: strides sx={sx}, sy={sy} must be >= 1")
    if h < 0 or w < 0:
        raise ValueError(f"random2d_partition: grid h={h}, w={w} must be >= 0")
    cells_y, cells_x = h // sy, w // sx
    if no_rand:
        local = torch.zeros(cells_y, cells_x, dtype=torch.int64, device=device)
    else:
        gen_device = generator.device if generator is not None else "cpu"
        local = torch.randint(
            sy * sx, (cells_y, cells_x), generator=generator, device=gen_device
        ).to(device)
    rows = torch.arange(cells_y, device=device)[:, None] * sy + local // sx
    cols = torch.arange(cells_x, device=device)[None, :] * sx + local % sx
    is_dst = torch.zeros(h * w, dtype=torch.bool, device=device)
    is_dst[(rows * w + cols).flatten()] = True
    return is_dst


# ----------------------------------------------------------------------------------------------
# Matching
# ----------------------------------------------------------------------------------------------


def _score_dtype(metric: torch.Tensor) -> torch.dtype:
    return torch.float64 if metric.dtype == torch.float64 else torch.float32


def _check_mask(mask: torch.Tensor | None, n: int, name: str, fn: str) -> None:
    if mask is None:
        return
    if mask.dtype != torch.bool or mask.shape != (n,):
        raise ValueError(
            f"{fn}: {name} must be a bool tensor of shape [{n}], "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def _identity_plan(batch: int, n: int, device: torch.device) -> MergePlan:
    pos = torch.arange(n, device=device).expand(batch, n).contiguous()
    empty = torch.empty(batch, 0, dtype=torch.int64, device=device)
    return MergePlan(dest=pos.clone(), origin=pos, src_idx=empty, dst_idx=empty.clone())


def _plan_from_edges(
    best_score: torch.Tensor,
    best_dst: torch.Tensor,
    a_pos: torch.Tensor,
    b_pos: torch.Tensor,
    n: int,
    r: int,
    layout: Layout,
) -> MergePlan:
    """Pick the top-r edges and build the plan.

    best_score: ``[B, Na]`` best similarity of each A token (``-inf`` = may not merge);
    best_dst: ``[B, Na]`` original position of that best B token; a_pos ``[Na]`` / b_pos ``[Nb]``:
    original positions of A / B tokens (ascending). ``r`` must not exceed the number of finite
    scores in any row.
    """
    batch = best_score.shape[0]
    device = best_score.device
    edge_order = torch.sort(best_score, dim=-1, descending=True, stable=True).indices
    src_local, unm_local = edge_order[:, :r], edge_order[:, r:]
    src_idx = a_pos[src_local]
    dst_idx = best_dst.gather(1, src_local)

    m = n - r
    if layout == "sorted":
        survives = torch.ones(batch, n, dtype=torch.bool, device=device)
        survives.scatter_(1, src_idx, False)
        origin = torch.arange(n, device=device).expand(batch, n)[survives].view(batch, m)
    elif layout == "tome":
        origin = torch.cat([a_pos[unm_local], b_pos.expand(batch, -1)], dim=1)
    else:
        raise ValueError(f"layout must be 'sorted' or 'tome', got {layout!r}")

    dest = torch.empty(batch, n, dtype=torch.int64, device=device)
    dest.scatter_(1, origin, torch.arange(m, device=device).expand(batch, m))
    dest.scatter_(1, src_idx, dest.gather(1, dst_idx))
    return MergePlan(dest=dest, origin=origin, src_idx=src_idx, dst_idx=dst_idx)


def bipartite_soft_matching(
    metric: torch.Tensor,
    r: int,
    is_dst: torch.Tensor | None = None,
    *,
    protected: torch.Tensor | None = None,
    layout: Layout = "sorted",
) -> MergePlan:
    """ToMe bipartite soft matching: plan the merge of ``r`` A tokens into their most similar B token.

    Args:
        metric: float ``[B, N, C]`` (e.g. keys averaged over heads). Similarity is the cosine,
            computed in fp32 (fp64 if ``metric`` is fp64). Not differentiated through.
        r: tokens to remove; clamped to the number of unprotected A tokens (0 if every B token is
            protected). ``r <= 0`` gives the identity plan.
        is_dst: bool ``[N]``, True for B (destination) tokens. Default :func:`alternate_partition`;
            use :func:`random2d_partition` for tomesd's split.
        protected: optional bool ``[N]``; True tokens never merge (as source or destination).
        layout: order of the ``M = N - r`` output slots.
            ``"sorted"``: surviving tokens in their original order (CLS stays first).
            ``"tome"``: ToMe/tomesd's order of the A part, i.e. unmerged A tokens by decreasing
            best similarity (ties: lower index first), then all B tokens in original order. Not
            slot for slot tomesd's: tomesd orders its B rows by an unstable argsort (permuted from
            6x6 grids up), and ToMe with ``class_token=True`` re-sorts the A tokens by position.
            Values, sizes and groupings agree; compare after matching slots.

    Returns:
        :class:`MergePlan` with int64 index tensors on ``metric.device``.
    """
    if metric.dim() != 3:
        raise ValueError(f"bipartite_soft_matching: metric must be [B, N, C], got {tuple(metric.shape)}")
    batch, n, _ = metric.shape
    device = metric.device
    if is_dst is None:
        is_dst = alternate_partition(n, device)
    fn = "bipartite_soft_matching"
    _check_mask(is_dst, n, "is_dst", fn)
    _check_mask(protected, n, "protected", fn)
    is_dst = is_dst.to(device)
    protected = (
        torch.zeros(n, dtype=torch.bool, device=device) if protected is None else protected.to(device)
    )

    a_pos = torch.nonzero(~is_dst).flatten()
    b_pos = torch.nonzero(is_dst).flatten()
    mergeable_src = int((~protected[a_pos]).sum())
    open_dst = int((~protected[b_pos]).sum())
    r = min(max(r, 0), mergeable_src if open_dst > 0 else 0)
    if r == 0:
        return _identity_plan(batch, n, device)

    with torch.no_grad():
        unit = F.normalize(metric.to(_score_dtype(metric)), dim=-1)
        scores = unit[:, a_pos] @ unit[:, b_pos].transpose(1, 2)  # [B, Na, Nb]
        scores[:, protected[a_pos], :] = -torch.inf
        scores[:, :, protected[b_pos]] = -torch.inf
        best_local = scores.argmax(dim=-1)  # first maximum: lowest B index among ties
        best_score = scores.gather(2, best_local[..., None]).squeeze(2)
        return _plan_from_edges(best_score, b_pos[best_local], a_pos, b_pos, n, r, layout)


def random2d_soft_matching(
    metric: torch.Tensor,
    w: int,
    h: int,
    sx: int,
    sy: int,
    r: int,
    *,
    no_rand: bool = False,
    generator: torch.Generator | None = None,
    protected: torch.Tensor | None = None,
    layout: Layout = "sorted",
) -> MergePlan:
    """tomesd's matching: :func:`random2d_partition` then :func:`bipartite_soft_matching`.

    metric: ``[B, h * w, C]``. With the same partition, :func:`merge_tokens` and :func:`unmerge_tokens`
    give ``tomesd.merge.bipartite_soft_matching_random2d``'s merged tokens, sizes and unmerge up to
    the order of the output slots (see ``layout`` in :func:`bipartite_soft_matching`).
    """
    if metric.dim() != 3 or metric.shape[1] != h * w:
        raise ValueError(
            f"random2d_soft_matching: metric must be [B, h*w={h * w}, C], got {tuple(metric.shape)}"
        )
    is_dst = random2d_partition(h, w, sx, sy, no_rand=no_rand, generator=generator, device=metric.device)
    return bipartite_soft_matching(metric, r, is_dst, protected=protected, layout=layout)


def causal_adjacent_matching(
    metric: torch.Tensor,
    r: int,
    *,
    protected: torch.Tensor | None = None,
) -> MergePlan:
    """Causal ToMe for decoder LMs: only adjacent pairs ``(2k, 2k + 1)`` may merge.

    A is the even positions, B the odd ones, and A token ``2k``'s only candidate is its right
    neighbour ``2k + 1`` (the last token has none when N is odd). The r most similar pairs merge.
    Every merged slot therefore holds exactly two consecutive tokens and keeps the position of the
    later one (``plan.origin``, always ``layout="sorted"``): giving merged keys/values that position
    in a causal mask means a query sees a slot only if it could already see all of the slot's
    tokens, so no information flows from the future. (Unmerging copies the slot back to the
    earlier token too; that token then carries its right neighbour's information, which is
    acceptable only where it is, e.g. for compressed keys/values.)

    Args:
        metric: float ``[B, N, C]``; cosine similarity in fp32 (fp64 for fp64 input).
        r: pairs to merge; clamped to the number of complete, unprotected pairs.
        protected: optional bool ``[N]``; a pair containing a protected token never merges.

    Returns:
        :class:`MergePlan` with ``dst_idx == src_idx + 1`` and ``src_idx`` even.
    """
    if metric.dim() != 3:
        raise ValueError(f"causal_adjacent_matching: metric must be [B, N, C], got {tuple(metric.shape)}")
    batch, n, _ = metric.shape
    device = metric.device
    _check_mask(protected, n, "protected", "causal_adjacent_matching")
    protected = (
        torch.zeros(n, dtype=torch.bool, device=device) if protected is None else protected.to(device)
    )

    a_pos = torch.arange(0, n, 2, device=device)
    b_pos = torch.arange(1, max(n, 1), 2, device=device)
    has_pair = a_pos + 1 < n
    pair_ok = has_pair.clone()
    pair_ok[has_pair] &= ~protected[a_pos[has_pair]] & ~protected[a_pos[has_pair] + 1]
    r = min(max(r, 0), int(pair_ok.sum()))
    if r == 0:
        return _identity_plan(batch, n, device)

    with torch.no_grad():
        unit = F.normalize(metric.to(_score_dtype(metric)), dim=-1)
        neighbour = torch.clamp(a_pos + 1, max=n - 1)
        score = (unit[:, a_pos] * unit[:, neighbour]).sum(-1)  # [B, Na]
        score = score.masked_fill(~pair_ok, -torch.inf)
        best_dst = neighbour.expand(batch, -1)
        return _plan_from_edges(score, best_dst, a_pos, b_pos, n, r, "sorted")


# ----------------------------------------------------------------------------------------------
# Applying a plan
# ----------------------------------------------------------------------------------------------


def merge_tokens(
    x: torch.Tensor,
    plan: MergePlan,
    size: torch.Tensor | None = None,
    mode: Literal["mean", "sum"] = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``x`` into the plan's slots, tracking token sizes.

    Args:
        x: ``[B, N, C]`` float.
        plan: from a matching function (same B and N).
        size: optional ``[B, N]`` float, how many original tokens each token already stands for
            (None: all 1).
        mode: ``"mean"``: size-weighted average ``sum_i (size_i / S) * x_i`` with ``S = sum_i size_i``
            over each slot's tokens (with unit sizes this is tomesd's ``mode="mean"``; a slot of one
            token returns it unchanged); ``"sum"``: plain sum.

    Returns:
        ``(merged [B, M, C] in x.dtype, merged_size [B, M])``; sums are accumulated in fp32
        (fp64 for fp64 input); ``merged_size`` has ``size``'s dtype (fp32 if None), and its total
        equals that of ``size``.
    """
    if x.dim() != 3 or x.shape[:2] != plan.dest.shape:
        raise ValueError(
            f"merge_tokens: x must be [B, N, C] with [B, N] = {tuple(plan.dest.shape)}, got {tuple(x.shape)}"
        )
    batch, n, channels = x.shape
    m = plan.num_out
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    size_dtype = torch.float32 if size is None else size.dtype
    if size is None:
        size = torch.ones(batch, n, dtype=acc, device=x.device)
    elif size.shape != (batch, n):
        raise ValueError(f"merge_tokens: size must be [B, N] = {(batch, n)}, got {tuple(size.shape)}")
    size_acc = size.to(acc)
    dest = plan.dest.to(x.device)

    merged_size = torch.zeros(batch, m, dtype=acc, device=x.device).scatter_add_(1, dest, size_acc)
    index = dest[..., None].expand(batch, n, channels)
    if mode == "mean":
        # normalised weights, so a slot holding one token returns it bit for bit
        weight = size_acc / merged_size.gather(1, dest)
        weighted = x.to(acc) * weight[..., None]
        merged = torch.zeros(batch, m, channels, dtype=acc, device=x.device).scatter_add_(1, index, weighted)
    elif mode == "sum":
        merged = torch.zeros(batch, m, channels, dtype=acc, device=x.device).scatter_add_(1, index, x.to(acc))
    else:
        raise ValueError(f"merge_tokens: mode must be 'mean' or 'sum', got {mode!r}")
    return merged.to(x.dtype), merged_size.to(size_dtype)


def unmerge_tokens(y: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Inflate merged tokens back to the original count and order.

    y: ``[B, M, C]``. Returns ``[B, N, C]`` (y's dtype) where token ``i`` takes the value of its slot
    ``plan.dest[b, i]``: surviving tokens get their own slot, merged-away tokens their destination's.
    """
    batch, n = plan.dest.shape
    if y.dim() != 3 or y.shape[:2] != (batch, plan.num_out):
        raise ValueError(
            f"unmerge_tokens: y must be [B, M, C] with [B, M] = {(batch, plan.num_out)}, got {tuple(y.shape)}"
        )
    return y.gather(1, plan.dest.to(y.device)[..., None].expand(batch, n, y.shape[2]))


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """ToMe's proportional attention: ``log(size)`` added to the attention logits of each key.

    size: ``[B, M]`` positive float (e.g. ``merged_size`` from :func:`merge_tokens`). Returns
    ``[B, 1, 1, M]`` in size's dtype, to broadcast over heads and queries of ``[B, H, Sq, M]`` scores.
    A key standing for ``s`` tokens then gets the softmax weight of ``s`` identical keys.
    """
    if size.dim() != 2:
        raise ValueError(f"proportional_attention_bias: size must be [B, M], got {tuple(size.shape)}")
    return size.log()[:, None, None, :]
