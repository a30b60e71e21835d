"""Drop-in DeepSeek-V3 MoE block on latentmoe's fused routing and grouped-expert kernels."""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from latentmoe.nn._linear import check_float_dtype, is_plain, project
from latentmoe.ops._checks import autocast_off
from latentmoe.ops.moe import moe_experts, moe_experts_packed, moe_pack_experts, moe_route


def _recomputing() -> bool:
    """Whether this forward runs inside a backward pass: activation checkpointing recomputing it
    (the autograd engine has a current graph task). Not while tracing (torch.compile)."""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def _fp32_of(before: torch.Tensor | None, after: torch.Tensor) -> torch.Tensor:
    """``after`` (a router tensor after a module cast) in fp32: ``before``'s values where those were
    fp32 (not the cast's rounded ones), on ``after``'s device."""
    if after.dtype == torch.float32:
        return after
    if before is not None and before.dtype == torch.float32 and not before.is_meta and not after.is_meta:
        return before.to(after.device)
    return after.float()


class MoERouter(nn.Module):
    """Router parameters, named as HF ``DeepseekV3TopkRouter``: ``weight [E, hidden]`` (fp32) and
    the ``e_score_correction_bias [E]`` buffer (fp32, selection only).

    Both stay fp32 whatever dtype the module is cast to or loaded from (``.to(torch.bfloat16)``,
    ``.half()``, ``load_state_dict`` with ``assign=True``), as HF's ``from_pretrained`` keeps
    them (``_keep_in_fp32_modules_strict``): routing on a bf16-rounded router weight picked a
    different expert set for ~1% of tokens (64 experts, top-6, hidden 512) than the fp32 weight
    of an HF model loaded in bf16."""

    def __init__(self, num_experts: int, hidden_size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts, dtype=torch.float32))
        nn.init.normal_(self.weight, std=hidden_size**-0.5)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Router logits ``[T, E]`` fp32 of ``hidden [T, hidden]`` (HF's fp32 linear). MoE calls
        this only when the router is hooked or wrapped (e.g. accelerate's offloading); otherwise
        ``moe_route`` reads the weight itself."""
        with autocast_off(hidden.device.type):
            return F.linear(hidden.float(), self.weight.float())

    def _apply(self, fn, recurse=True):
        # The bias and the weight stay fp32, values included, through .to(dtype) / .half() (as HF's
        # from_pretrained keeps them, via _keep_in_fp32_modules_strict): update_bias's steps of
        # gamma = 1e-3 vanish in bf16 once |bias| > 0.25 (its spacing there is 2e-3), so balancing
        # would silently stop; a rounded weight changes which experts some tokens get. Only the
        # device (or the storage, for to_empty) follows fn.
        bias = self.e_score_correction_bias
        # (.data: the weight's storage before fn; the Parameter itself may get fn's result in place.)
        weight = self.weight.data
        grad = None if self.weight.grad is None else self.weight.grad.data
        super()._apply(fn, recurse)
        self.e_score_correction_bias = _fp32_of(bias, self.e_score_correction_bias)
        w = self.weight
        if w.dtype != torch.float32:
            w.data = _fp32_of(weight, w.data)  # the same Parameter: an optimizer's reference holds
            if w.grad is not None:
                w.grad = _fp32_of(grad, w.grad)
        return self

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        # load_state_dict(assign=True) puts the state dict's own tensor in place: fp32 again, as
        # in _apply (a bf16 checkpoint's bias and weight would otherwise stay bf16).
        bias = self.e_score_correction_bias
        if bias.dtype != torch.float32:
            self.e_score_correction_bias = bias.float()
        w = self.weight
        if w.dtype != torch.float32:
            w.data = w.data.float()


# Optimizer steps taken in this process since the first pack() (torch.optim's global step hook,
# registered then): part of the packed experts' weight stamp. Each step stores the next value of
# one counter (next() on an itertools.count is atomic under the GIL): the stamp never comes back
# to an old value, whichever threads step.
_OPTIMIZER_STEPS = [0]
_STEP_COUNTER = itertools.count(1)
_STEP_HOOK = []
_STEP_HOOK_LOCK = threading.Lock()


def _count_optimizer_steps() -> None:
    with _STEP_HOOK_LOCK:
        if not _STEP_HOOK:
            def count(optimizer, args, kwargs):
                _OPTIMIZER_STEPS[0] = next(_STEP_COUNTER)

            from torch.optim.optimizer import register_optimizer_step_post_hook

            _STEP_HOOK.append(register_optimizer_step_post_hook(count))


class MoEExperts(nn.Module):
    """Routed experts in HF's 3-D layout: ``gate_up_proj [E, 2I, hidden]``,
    ``down_proj [E, hidden, I]``.

    :meth:`pack` switches a CPU module (bfloat16 or float32) to prepacked weights for inference
    (``ops.moe_experts_packed``: no per-call weight transposes; the packed copy costs the weights'
    memory again, more where ``I`` or ``hidden`` is not a multiple of 32 / 64 (the panels'
    padding), and is not in the ``state_dict``). A packed module re-packs by itself in eager
    forwards when its weights are replaced or changed in place (``load_state_dict``, ``copy_``,
    ``torch.optim`` steps, fused ones included: the parameters' storage or version counter, and
    a count of optimizer steps), and refuses forwards that need a gradient; changes that bypass
    all of these (writes through ``.data``, in-place writes to inference-tensor weights under
    ``torch.inference_mode()`` other than by ``load_state_dict``), and weight changes between
    calls of a ``torch.compile``d forward (which uses the copy it traced), need :meth:`pack` again.
    :meth:`unpack` goes back to the HF layout (training)."""

    # Class defaults: modules pickled before packing existed unpickle unpacked.
    _pack = False
    _packed = None  # (gate_up_packed, down_packed, stamp of the weights they came from)

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        nn.init.normal_(self.gate_up_proj, std=hidden_size**-0.5)
        nn.init.normal_(self.down_proj, std=intermediate_size**-0.5)

    # ---- prepacked inference -------------------------------------------------------------------
    def _stamp(self, weights: tuple | None = None) -> tuple:
        # Fused optimizer steps (torch._fused_adamw_, HF Trainer's default AdamW) change parameters
        # without counting a version: the count of optimizer steps taken in this process stands in
        # (any optimizer's: a step of another model's optimizer costs a re-pack too). Inference
        # tensors (made under torch.inference_mode) have no version counter: load_state_dict drops
        # the packed copy itself; other in-place writes to them need pack().
        # The storage is held by a weak reference (the storage's Python object lives as long as
        # the storage): an address alone is reused, e.g. a weight replaced twice (or cast there
        # and back) can land at the stamped address with the same version, and the old copy stayed
        # in use. A strong reference would keep replaced weights alive.
        return (_OPTIMIZER_STEPS[0],) + tuple(
            (weakref.ref(p.untyped_storage()), p.data_ptr(), None if p.is_inference() else p._version,
             tuple(p.shape), p.dtype, p.device)
            for p in (weights or (self.gate_up_proj, self.down_proj)))

    def _stamp_current(self, stamp: tuple) -> bool:
        """Whether the weights are still those ``stamp`` (from :meth:`_stamp`) was taken of."""
        now = self._stamp()
        return stamp[0] == now[0] and all(
            old[0]() is new[0]() and old[1:] == new[1:]  # a dead weakref is None, never a live storage
            for old, new in zip(stamp[1:], now[1:]))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # New weights: the packed copy is made again at the next eager forward (load_state_dict
        # under inference mode writes inference tensors in place without a version to show it; a
        # compiled forward raises until then instead of using the old copy). Only when this
        # module's weights were in the state dict (a partial strict=False load keeps it).
        if any(prefix + name in state_dict for name in ("gate_up_proj", "down_proj")):
            self._packed = None

    def _repack(self) -> None:
        _count_optimizer_steps()
        gu, dn = self.gate_up_proj, self.down_proj
        for name, p in (("gate_up_proj", gu), ("down_proj", dn)):
            if p.dtype not in (torch.bfloat16, torch.float32) or p.device.type != "cpu":
                raise ValueError(
                    f"latentmoe.nn.MoEExperts.pack: packed experts need bfloat16 or float32 weights on the "
                    f"CPU, '{name}' is {p.dtype} on {p.device} (cast them, or unpack())"
                )
        # The stamp first, of the very tensors packed: a weight change (another thread's optimizer
        # step, or a parameter replaced) while the op packs then shows at the next forward, instead
        # of being stamped onto the old copy (the stamp read the attributes again, so a weight
        # replaced between the two reads was stamped onto panels of the old one).
        stamp = self._stamp((gu, dn))
        with torch.no_grad():
            self._packed = (*moe_pack_experts(gu.detach(), dn.detach()), stamp)

    def pack(self) -> "MoEExperts":
        """Pack the weights now (``ops.moe_pack_experts``) and run later forwards on them."""
        self._repack()
        self._pack = True
        return self

    def unpack(self) -> "MoEExperts":
        """Drop the packed copy; forwards run ``ops.moe_experts`` on the HF layout again."""
        self._pack, self._packed = False, None
        return self

    @property
    def is_packed(self) -> bool:
        return self._pack

    def __getstate__(self):
        state = super().__getstate__()
        return dict(state, _packed=None)  # copies (deepcopy, pickle) re-pack on first use

    def forward(self, hidden: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                check_values: bool = True):
        """``[T, hidden]``, ``[T, k]``, ``[T, k]`` -> ``[T, hidden]`` (see ``ops.moe_experts``;
        ``check_values=False`` for indices from a router: no device sync on CUDA)."""
        if not self._pack:
            return moe_experts(hidden, self.gate_up_proj, self.down_proj, weights, indices, check_values)
        if torch.is_grad_enabled() and any(t.requires_grad for t in (hidden, weights, self.gate_up_proj,
                                                                       self.down_proj)):
            raise RuntimeError(
                "latentmoe.nn.MoEExperts: the experts are packed for inference (pack()); run the forward "
                "under torch.no_grad() / torch.inference_mode(), or call unpack() to train"
            )
        if torch.compiler.is_compiling():
            # Traced: the packed copy is a constant of the graph (a re-pack in eager replaces it,
            # and the changed attribute recompiles); the weight check runs in eager calls only.
            if self._packed is None:
                raise RuntimeError(
                    "latentmoe.nn.MoEExperts: call pack() outside torch.compile (the packed copy of a copy "
                    "(deepcopy, pickle), or after load_state_dict, is made at its first eager forward)"
                )
        elif self._packed is None or not self._stamp_current(self._packed[2]):
            self._repack()
        gate_up_packed, down_packed, _ = self._packed
        return moe_experts_packed(hidden, gate_up_packed, down_packed, weights, indices,
                                  self.gate_up_proj.shape[1] // 2)


class SharedExperts(nn.Module):
    """Dense SwiGLU MLP named as HF ``DeepseekV3MLP`` (gate_proj, up_proj, down_proj)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        with warnings.catch_warnings():  # zero-width (no shared experts): torch warns its init is a no-op
            warnings.filterwarnings("ignore", "Initializing zero-element tensors is a no-op")
            self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
            self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return project(self.down_proj, F.silu(project(self.gate_proj, x)) * project(self.up_proj, x))


class MoE(nn.Module):
    """DeepSeek-V3 mixture-of-experts block; ``state_dict`` identical to HF ``DeepseekV3MoE``.

    Args:
        config: an HF ``DeepseekV3Config`` (or any object with ``hidden_size``,
            ``moe_intermediate_size``, ``n_routed_experts``, ``num_experts_per_tok``, ``n_group``,
            ``topk_group`` (``n_group <= 64``), ``norm_topk_prob``, ``routed_scaling_factor``;
            optionally ``n_shared_experts`` (default 0: zero-width shared experts, as HF builds them);
            ``hidden_act`` must be ``"silu"``).
        score_func: ``"sigmoid"`` (V3) or ``"softmax"``; default ``config.scoring_func`` if present,
            else ``"sigmoid"``.
        aux_loss_alpha: balance-loss weight alpha (default ``config.aux_loss_alpha`` or 0: off).
        seq_aux: sequence-wise balance loss (per sequence of a ``[B, S, hidden]`` input, averaged;
            a ``[T, hidden]`` input is one sequence) instead of the expert-level one over all the
            call's tokens (default ``config.seq_aux`` or False).
        bias_update_speed: gamma of the aux-loss-free bias update (default 0.001).

    After each forward: ``last_load`` (``[E]`` int64 tokens per expert), ``load_counts``
    (accumulated over training-mode forwards since the last ``update_bias``: eval-mode forwards,
    e.g. validation, set ``last_load`` only, so the aux-loss-free update balances the training
    batches, as DeepSeek-V3's does. HF's ``generate`` keeps the model's mode: a model left in
    ``train()`` counts its generated tokens and replaces ``aux_loss``; call ``model.eval()``
    before generating between training steps, or generate inside :func:`no_load_counting`,
    e.g. RL rollouts from a model kept in training mode; ``count_loads = False`` on one module
    does the same) and, after a training-mode forward with
    ``aux_loss_alpha > 0``, ``aux_loss`` (0-d fp32, differentiable w.r.t. the router weight;
    None after eval-mode forwards). The balance loss is ``alpha * E * sum_i f_i P_i`` (per sequence
    and averaged with ``seq_aux``): ``f_i`` the share of the k picks made (biased and
    group-limited selection, as DeepSeek's code) that went to expert i, ``P_i`` the mean over
    tokens of the token's scores normalised to sum 1 (V3's s', for sigmoid scoring too). Padding
    tokens count like any other (the module takes no mask, as HF's). Under activation
    checkpointing, the recomputation during backward leaves them as the forward set them (loads
    counted once). Reentrant checkpointing (``use_reentrant=True``) runs the forward without
    autograd, so ``aux_loss`` then has no gradient: use the non-reentrant kind (HF's default).
    The router's ``gate.weight`` and ``e_score_correction_bias`` stay fp32 whatever dtype the module
    is cast to (as HF's ``from_pretrained`` keeps them; see :class:`MoERouter`).

    Data parallelism (DDP, FSDP): ``load_counts`` counts this process's tokens (it is not a
    buffer, so DDP's buffer broadcast leaves it alone); pass ``group=`` to :meth:`update_bias` to
    update every rank's bias from the global load. ``aux_loss`` is computed over each rank's own
    tokens: the expert-level loss is then the per-rank (per-device) balance loss, not the loss of
    the concatenated batch (its load x probability product is not linear across ranks); the
    sequence-wise one (``seq_aux``) averaged over ranks equals the single-process figure when every
    rank has the same number of sequences.
    HF's ``output_router_logits`` records HF's own router class by hooks: with this module swapped
    into an HF model it comes back empty.
    """

    # Training-mode forwards add to load_counts; no_load_counting() turns it off per module. A class
    # default, not set in __init__, so modules pickled before the attribute existed count too.
    count_loads = True

    def __init__(
        self,
        config,
        *,
        score_func: str | None = None,
        aux_loss_alpha: float | None = None,
        seq_aux: bool | None = None,
        bias_update_speed: float = 0.001,
    ):
        super().__init__()
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"latentmoe.nn.MoE supports hidden_act='silu' only, got {act!r}")
        self.hidden_size = config.hidden_size
        self.num_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.score_func = score_func or getattr(config, "scoring_func", "sigmoid")
        self.aux_loss_alpha = float(
            aux_loss_alpha if aux_loss_alpha is not None else getattr(config, "aux_loss_alpha", 0.0)
        )
        self.seq_aux = bool(seq_aux if seq_aux is not None else getattr(config, "seq_aux", False))
        self.bias_update_speed = float(bias_update_speed)
        for name, value in (("aux_loss_alpha", self.aux_loss_alpha), ("bias_update_speed", self.bias_update_speed)):
            if not math.isfinite(value) or value < 0:  # (a negative speed moves biases away from balance)
                raise ValueError(f"latentmoe.nn.MoE: '{name}' must be finite and >= 0, got {value!r}")
        inter = config.moe_intermediate_size
        for field, value in (("hidden_size", self.hidden_size), ("moe_intermediate_size", inter),
                             ("n_routed_experts", self.num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"latentmoe.nn.MoE: config.{field} must be an int >= 1, got {value!r}")
        self.experts = MoEExperts(self.num_experts, self.hidden_size, inter)
        self.gate = MoERouter(self.num_experts, self.hidden_size)
        n_shared = getattr(config, "n_shared_experts", 0) or 0
        # Built even with 0 shared experts (zero-width, as HF builds it: the same state_dict keys);
        # then skipped in forward unless their weights are to get (zero-size) grads (DDP).
        self.shared_experts = SharedExperts(self.hidden_size, inter * n_shared)
        self.aux_loss: torch.Tensor | None = None
        self.last_load: torch.Tensor | None = None
        # A plain tensor attribute, not a buffer: DDP broadcasts rank 0's buffers into every rank at
        # each forward, which would overwrite each rank's own counts (see update_bias's group). _apply
        # moves it with the module; it is not in the state_dict. A normal tensor even when the
        # module is built under torch.inference_mode() (an inference tensor cannot be counted into
        # in place outside it, and a compiled forward cannot test for one).
        self.load_counts = self._zero_counts()

    def _zero_counts(self, device=None) -> torch.Tensor:
        with torch.inference_mode(False):  # a normal tensor, also under inference_mode (see __init__)
            return torch.zeros(self.num_experts, dtype=torch.int64, device=device)

    def extra_repr(self) -> str:
        return (
            f"hidden={self.hidden_size}, experts={self.num_experts}, top_k={self.top_k}, "
            f"groups={self.topk_group}/{self.n_group}, score={self.score_func}, "
            f"norm={self.norm_topk_prob}, scale={self.routed_scaling_factor}"
        )

    def route(self, x: torch.Tensor):
        """Routing of ``x [T, hidden]``: ``(weights [T,k] fp32, indices [T,k] int64, scores [T,E])``."""
        plain = is_plain(self.gate, MoERouter)  # else its call brings in its weight (hooks)
        return moe_route(
            x if plain else self.gate(x),
            self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            e_score_correction_bias=self.gate.e_score_correction_bias.float(),
            score_func=self.score_func,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
            router_weight=self.gate.weight if plain else None,
        )

    def _apply(self, fn, recurse=True):
        # load_counts moves with the module (.to, .cuda) as a buffer would, and stays int64. It is
        # not in the state_dict, so where fn gives uninitialised storage (to_empty, from meta or
        # not) it starts again from zeros: wherever the moved values differ from the counts (a
        # copy or cast keeps them; garbage equal to the counts is the counts).
        super()._apply(fn, recurse)
        counts = self.load_counts
        with torch.inference_mode(False):  # (a normal tensor, as in __init__)
            moved = fn(counts).to(torch.int64)
            if not moved.is_meta and (counts.is_meta or not torch.equal(moved.to(counts.device), counts)):
                moved.zero_()
        self.load_counts = moved
        return self

    def __getstate__(self):
        # aux_loss is part of the last training step's autograd graph: copies (deepcopy, pickle:
        # an EMA or eval copy) take its value, not the graph (which deepcopy refuses).
        state = super().__getstate__()
        if isinstance(state.get("aux_loss"), torch.Tensor):
            state = dict(state, aux_loss=state["aux_loss"].detach())
        return state

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[..., hidden]`` -> ``[..., hidden]`` in the input dtype (as HF ``DeepseekV3MoE``).

        Under ``torch.autocast`` the router runs in fp32 (as DeepSeek's gating does) and the
        routed experts in their weights' dtype (the hidden states are cast to it); the shared
        experts follow autocast like any ``nn.Linear``."""
        check_float_dtype("MoE", "hidden_states", hidden_states)
        shape = hidden_states.shape
        if hidden_states.dim() == 0 or shape[-1] != self.hidden_size:
            raise ValueError(
                f"latentmoe.nn.MoE: 'hidden_states' must be [..., hidden_size={self.hidden_size}], got shape "
                f"{list(shape)}"
            )
        x = hidden_states.reshape(-1, self.hidden_size)
        # Repairs of load_counts (the first two in compiled forwards too: static facts the graph
        # is guarded on).
        if self.load_counts.is_meta:  # loaded with load_state_dict(assign=True) after meta init
            self.load_counts = self._zero_counts(x.device)
        elif self.load_counts.device != x.device:  # parameters moved without _apply (FSDP's own moves)
            with torch.inference_mode(False):
                self.load_counts = self.load_counts.to(x.device)
        elif (not torch.compiler.is_compiling() and self.load_counts.is_inference()
              and not torch.is_inference_mode_enabled()):  # (is_inference() cannot be traced)
            # Made under torch.inference_mode(), used outside it: an inference tensor can't be
            # updated in place there, so the counts move to a normal tensor.
            self.load_counts = self.load_counts.clone()
        weights, indices, scores = self.route(x)
        # The indices come from the router, always in range: no index check, so no device sync
        # (a CUDA graph can capture this forward).
        xe = x
        if xe.dtype != self.experts.gate_up_proj.dtype and torch.is_autocast_enabled(xe.device.type):
            xe = xe.to(self.experts.gate_up_proj.dtype)
        out = self.experts(xe, weights, indices, check_values=False).to(x.dtype).view(shape)
        shared = self.shared_experts
        # Zero-width shared experts (n_shared_experts=0) add nothing: skipped, except when their
        # weights are to get gradients (zero-size ones, as HF's): DDP needs every parameter that
        # requires grad to get one in each backward.
        zero_width = isinstance(shared, SharedExperts) and shared.down_proj.in_features == 0
        if shared is not None and (not zero_width or (
                torch.is_grad_enabled() and any(p.requires_grad for p in shared.parameters()))):
            out = out + shared(hidden_states)
        # Activation checkpointing's second run keeps the figures of the first (it still computes the
        # balance loss: non-reentrant checkpointing checks that both runs save the same tensors).
        recompute = _recomputing()
        # Training mode alone decides what counts, not grad mode: reentrant checkpointing of a
        # decoder layer runs its first forward (the one that counts) under no_grad, on inputs that
        # need not require grad. HF's generate keeps the model's mode: eval() before it.
        if not recompute:
            with torch.no_grad():  # counts without bincount (which reads its max back to the host)
                flat = indices.reshape(-1)
                load = torch.zeros(self.num_experts, dtype=torch.int64, device=flat.device).index_add_(
                    0, flat, torch.ones_like(flat))
                self.last_load = load
                if self.training and self.count_loads:  # the bias update balances training batches
                    self.load_counts += load
        aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            if self.seq_aux and len(shape) not in (2, 3):
                raise ValueError(
                    "latentmoe.nn.MoE: seq_aux needs hidden_states [B, S, hidden] (sequences) or "
                    f"[T, hidden] (one sequence), got {tuple(shape)}"
                )
            batch = shape[0] if self.seq_aux and len(shape) == 3 else 1  # [T, hidden]: one sequence
            aux_loss = self._balance_loss(scores, indices, batch)
        if not recompute:
            self.aux_loss = aux_loss
        return out

    def _balance_loss(self, scores: torch.Tensor, indices: torch.Tensor, batch: int) -> torch.Tensor:
        """``alpha * E * sum_i f_i P_i`` per sequence (``batch`` of them), averaged."""
        E, k = self.num_experts, self.top_k
        T = scores.shape[0]
        if T == 0:  # no tokens: nothing to balance (0, not 0 / 0)
            return scores.sum() * 0.0
        s = scores.view(batch, T // batch, E)
        # + 1e-20 (as norm_topk_prob): a token whose sigmoid scores all underflow to 0 adds 0, not 0/0.
        p = (s / (s.sum(dim=-1, keepdim=True) + 1e-20)).mean(dim=1)  # [B, E]
        counts = torch.zeros(batch, E, device=scores.device, dtype=torch.float32)
        chosen = indices.view(batch, -1)
        counts.scatter_add_(1, chosen, torch.ones_like(chosen, dtype=torch.float32))
        f = counts / ((T // batch) * k)
        return self.aux_loss_alpha * E * (f * p).sum(dim=-1).mean()

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor | None = None, gamma: float | None = None, *, group=None) -> None:
        """Aux-loss-free balancing: ``bias += gamma * sign(mean(load) - load)``.

        Args:
            load: ``[E]`` tokens per expert (counts; finite, not NaN); default ``load_counts``:
                the counts of the training steps since the last call that used them (they are
                then reset; a call with an explicit ``load`` leaves them).
            gamma: update speed (finite, >= 0); default ``bias_update_speed``.
            group: under data parallelism, a ``torch.distributed`` process group (e.g.
                ``torch.distributed.group.WORLD``): ``load`` is summed over it first (an
                ``all_reduce``, a collective every rank of the group must call), so every rank
                applies the same update from the global load. ``None``: this process's load only,
                and ranks whose batches differ drift apart (DDP's default ``broadcast_buffers``
                then copies rank 0's bias into every rank at its next forward).
        """
        gamma = self.bias_update_speed if gamma is None else float(gamma)
        if not math.isfinite(gamma) or gamma < 0:
            raise ValueError(f"MoE.update_bias: 'gamma' must be finite and >= 0, got {gamma!r}")
        if load is None:
            load = self.load_counts.clone()
            if self.load_counts.is_inference() and not torch.is_inference_mode_enabled():
                self.load_counts = torch.zeros_like(self.load_counts)  # as in forward
            else:
                self.load_counts.zero_()
        if load.shape != (self.num_experts,):
            raise ValueError(
                f"MoE.update_bias: 'load' must have shape ({self.num_experts},), got {tuple(load.shape)}"
            )
        if load.is_floating_point() and not bool(torch.isfinite(load).all()):  # (counts: no host sync)
            raise ValueError("MoE.update_bias: 'load' holds NaN or inf (sign(NaN) is 0: no update at all)")
        if group is not None:
            import torch.distributed as dist

            load = load.to(torch.float64 if load.is_floating_point() else torch.int64).clone()  # not the caller's
            dist.all_reduce(load, op=dist.ReduceOp.SUM, group=group)
        # Compared in float64: fp32 rounds counts above 2^24 (global counts, long accumulations),
        # and an expert just off the mean got sign 0.
        load = load.to(torch.float64)
        bias = self.gate.e_score_correction_bias
        if bias.is_inference() and not torch.is_inference_mode_enabled():  # as load_counts in forward
            bias = self.gate.e_score_correction_bias = bias.clone()
        bias += gamma * torch.sign(load.mean() - load).to(bias.dtype)


@contextlib.contextmanager
def no_load_counting(model: nn.Module):
    """Within the block, training-mode forwards of every :class:`MoE` in ``model`` leave
    ``load_counts`` alone (``count_loads = False``; each module's setting is restored on exit,
    also on an exception): e.g. ``generate`` rollouts of a model kept in ``train()`` mode, whose
    tokens must not steer :meth:`MoE.update_bias`. ``last_load`` and ``aux_loss`` are still set
    by each forward, as in eval mode's rules for ``last_load`` and training mode's for
    ``aux_loss``. The setting is the modules' own, not per thread: a training step that runs the
    same modules in another thread meanwhile does not count either."""
    mods = [m for m in model.modules() if isinstance(m, MoE)]
    saved = [m.count_loads for m in mods]
    for m in mods:
        m.count_loads = False
    try:
        yield model
    finally:
        for m, was in zip(mods, saved):
            m.count_loads = was


def _experts_modules(model: nn.Module) -> list[MoEExperts]:
    return [m for m in model.modules() if isinstance(m, MoEExperts)]


def pack_experts(model: nn.Module) -> int:
    """:meth:`MoEExperts.pack` every latentmoe MoE experts module in ``model`` (bfloat16 or float32
    on the CPU, for inference); returns how many were packed. :func:`unpack_experts` undoes it."""
    mods = _experts_modules(model)
    for m in mods:
        m.pack()
    return len(mods)


def unpack_experts(model: nn.Module) -> int:
    """:meth:`MoEExperts.unpack` every latentmoe MoE experts module in ``model``; returns the count."""
    mods = _experts_modules(model)
    for m in mods:
        m.unpack()
    return len(mods)
