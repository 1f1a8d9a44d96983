"""A dropless mixture-of-experts feed-forward layer with expert parallelism.

Each rank of the EP group holds ``num_experts / P`` experts (SwiGLU MLPs).  A
forward routes every token to its top-k experts, sends each (token, expert)
*slot* to the rank that computes it (all-to-all with uneven splits), computes,
and sends the results back.  Nothing is dropped or padded.

Who computes what is a plan over the global per-expert loads (llep.py):
``dispatcher="standard"`` computes every expert on its home rank;
``dispatcher="llep"`` lets lightly loaded ranks borrow hot experts' weights
(point-to-point) and compute slices of their tokens, returning the weight
gradients to the owners in backward.

Every rank runs the same sequence of messages whatever the data: forward
(all-gather counts, weight sends, all-to-all, all-to-all), backward
(all-to-all, weight-gradient sends, all-to-all), all inside one autograd node
that is always part of the graph, so zero-token ranks, skewed routing, stacked
layers and activation checkpointing cannot desynchronise the ranks.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from loom import comms
from loom.comms.agree import dtype_code, dtype_name

from .llep import LLEPConfig, LLEPPlan, llep_plan, standard_plan
from .placement import declare_placements

DISPATCHERS = ("standard", "llep")
GATINGS = ("topk_softmax", "softmax_topk")
_UNSET = object()
_FIELDS = ("dim", "hidden", "num_experts", "top_k", "dispatcher", "dtype", "weight dtype")



def _kind(x) -> str:
    return f"{x.dtype} tensor" if isinstance(x, torch.Tensor) else type(x).__name__


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"MoE {name}={value!r} must be a positive integer")
    return value


def expert_mlp(x, w_gate, w_up, w_down):
    """One SwiGLU expert: ``(silu(x @ w_gate) * (x @ w_up)) @ w_down``."""
    return (F.silu(x @ w_gate) * (x @ w_up)) @ w_down


def _expert_mlp_backward(x, hg, hu, w_gate, w_up, w_down, grad_y):
    """Gradients of `expert_mlp` w.r.t. (x, w_gate, w_up, w_down), given the
    forward's pre-activations ``hg = x @ w_gate`` and ``hu = x @ w_up``."""
    act = F.silu(hg)
    grad_h = grad_y @ w_down.T
    grad_down = (act * hu).T @ grad_y
    grad_hu = grad_h * act
    grad_hg = torch.ops.aten.silu_backward(grad_h * hu, hg)
    grad_x = torch.addmm(grad_hg @ w_gate.T, grad_hu, w_up.T)
    return grad_x, x.T @ grad_hg, x.T @ grad_hu, grad_down


class Route:
    """Who sends which slots where, derived from the global counts and a plan.

    ``counts[p][e]`` is the number of slots of expert ``e`` on group position
    ``p``; expert ``e``'s global slot order is position 0's slots, then 1's,
    ... (each in local order), which is what the plan's ranges index."""

    def __init__(self, counts: list[list[int]], plan: LLEPPlan, me: int, experts_per_rank: int):
        world, num_experts = len(counts), len(counts[0])
        # segments[p]: (expert, destination, n) of source p, in (expert, slice) order
        segments: list[list[tuple[int, int, int]]] = [[] for _ in range(world)]
        for e in range(num_experts):
            lo = 0
            for p in range(world):
                hi = lo + counts[p][e]
                for rank, start, end in plan.ranges[e]:
                    n = min(end, hi) - max(start, lo)
                    if n > 0:
                        segments[p].append((e, rank, n))
                lo = hi
            if lo != sum(end - start for _, start, end in plan.ranges[e]):
                raise RuntimeError(f"plan slices of expert {e} do not tile its load {lo}")
        self.world, self.me, self.experts_per_rank = world, me, experts_per_rank
        mine = segments[me]
        self.send_dest = [(dest, n) for _, dest, n in mine]
        self.send_splits = [sum(n for _, d, n in mine if d == r) for r in range(world)]
        self.recv_splits = [sum(n for _, d, n in segments[p] if d == me) for p in range(world)]
        self.recv_experts = [(e, n) for p in range(world) for e, d, n in segments[p] if d == me]
        self.transfers = plan.transfers
        self.borrowed = [e for e, _, dst in plan.transfers if dst == me]

    def owns(self, expert: int) -> bool:
        return expert // self.experts_per_rank == self.me

    def local_index(self, expert: int) -> int:
        return expert - self.me * self.experts_per_rank


def _all_to_all(t: torch.Tensor, send_splits, recv_splits, group, world: int) -> torch.Tensor:
    if world == 1:
        return t
    return comms.all_to_all_v(t, send_splits, recv_splits, group)


class _ExpertParallel(torch.autograd.Function):
    """Slots in send order -> expert outputs in the same order, across the group.

    One node for the whole exchange, so its backward messages run in one fixed
    order on every rank (see the module docstring)."""

    @staticmethod
    def forward(ctx, x_send, w_gate, w_up, w_down, route: Route, group, ranks):
        own = (w_gate, w_up, w_down)
        borrowed = _exchange_weights(route, own, group, ranks)  # flat buffers, plan order
        x_recv = _all_to_all(x_send, route.send_splits, route.recv_splits, group, route.world)
        experts, order, sizes = _compute_order(route, x_send.device)
        xs = x_recv.index_select(0, order)
        ys = torch.empty_like(xs)
        hidden = w_gate.shape[-1]
        hg, hu = xs.new_empty((xs.shape[0], hidden)), xs.new_empty((xs.shape[0], hidden))
        for e, lo, hi in _pieces(experts, sizes, route.experts_per_rank):
            wg, wu, wd = _weights_of(e, route, own, borrowed)
            torch.matmul(xs[lo:hi], wg, out=hg[lo:hi])
            torch.matmul(xs[lo:hi], wu, out=hu[lo:hi])
            ys[lo:hi] = (F.silu(hg[lo:hi]) * hu[lo:hi]) @ wd
        ctx.route, ctx.group, ctx.ranks, ctx.experts = route, group, ranks, (experts, sizes)
        # Always save tensors (even empty ones), so activation checkpointing
        # recomputes this node's messages on every rank alike.
        ctx.save_for_backward(xs, hg, hu, order, w_gate, w_up, w_down, *borrowed)
        y_recv = torch.empty_like(x_recv).index_copy_(0, order, ys)
        return _all_to_all(y_recv, route.recv_splits, route.send_splits, group, route.world)

    @staticmethod
    def backward(ctx, grad_send):
        with comms.agreed():  # the layer's entry agreement covers its backward messages too
            return _ExpertParallel._backward(ctx, grad_send)

    @staticmethod
    def _backward(ctx, grad_send):
        route, group, ranks = ctx.route, ctx.group, ctx.ranks
        xs, hg, hu, order, w_gate, w_up, w_down, *borrowed = ctx.saved_tensors
        own = (w_gate, w_up, w_down)
        grad_recv = _all_to_all(grad_send.contiguous(), route.send_splits, route.recv_splits,
                                group, route.world)
        gs = grad_recv.index_select(0, order)
        grad_xs = torch.empty_like(gs)
        grad_own = [torch.zeros_like(w) for w in own]
        grad_borrowed = [torch.zeros_like(b) for b in borrowed]
        for e, lo, hi in _pieces(*ctx.experts, route.experts_per_rank):
            grad_xs[lo:hi], *gw = _expert_mlp_backward(xs[lo:hi], hg[lo:hi], hu[lo:hi],
                                                       *_weights_of(e, route, own, borrowed), gs[lo:hi])
            if route.owns(e):
                for acc, g in zip(grad_own, gw):
                    acc[route.local_index(e)] += g
            else:
                grad_borrowed[route.borrowed.index(e)] += torch.cat([g.reshape(-1) for g in gw])
        _return_weight_grads(route, grad_own, grad_borrowed, group, ranks)
        grad_x_recv = torch.empty_like(grad_recv).index_copy_(0, order, grad_xs)
        grad_x_send = _all_to_all(grad_x_recv, route.recv_splits, route.send_splits, group, route.world)
        return grad_x_send, *grad_own, None, None, None


_MIN_PIECE = 256


def _pieces(experts, sizes, experts_per_rank):
    """(expert, lo, hi) row ranges of the expert-ordered rows, each expert cut
    into pieces of at most (rows / experts_per_rank), so the temporaries in
    flight stay as small under skew (one expert holding every row) as when
    balanced."""
    limit = max(_MIN_PIECE, -(-sum(sizes) // experts_per_rank))
    lo = 0
    for e, n in zip(experts, sizes):
        for start in range(lo, lo + n, limit):
            yield e, start, min(start + limit, lo + n)
        lo += n


def _compute_order(route: Route, device):
    """Received rows grouped by expert: (experts, permutation, rows per expert)."""
    ids = torch.tensor([e for e, _ in route.recv_experts], dtype=torch.long, device=device)
    reps = torch.tensor([n for _, n in route.recv_experts], dtype=torch.long, device=device)
    order = torch.argsort(torch.repeat_interleave(ids, reps), stable=True)
    totals: dict[int, int] = {}
    for e, n in route.recv_experts:
        totals[e] = totals.get(e, 0) + n
    experts = sorted(totals)
    return experts, order, [totals[e] for e in experts]


def _weights_of(e: int, route: Route, own, borrowed):
    """(w_gate, w_up, w_down) of expert ``e``: a slice of this rank's own stacks
    or views into a received flat buffer."""
    if route.owns(e):
        return tuple(w[route.local_index(e)] for w in own)
    flat, out, offset = borrowed[route.borrowed.index(e)], [], 0
    for w in own:
        n = w[0].numel()
        out.append(flat[offset:offset + n].view(w.shape[1:]))
        offset += n
    return tuple(out)


def _flat_expert(tensors, index: int) -> torch.Tensor:
    return torch.cat([t[index].reshape(-1) for t in tensors])


def _exchange_weights(route: Route, own, group, ranks) -> list[torch.Tensor]:
    """Send lent experts' weights, receive borrowed ones (in plan order)."""
    pending, inbox = [], []
    size = sum(w[0].numel() for w in own)
    for e, src, dst in route.transfers:
        if src == route.me:
            pending.append(comms.isend(_flat_expert(own, route.local_index(e)), ranks[dst], group))
        elif dst == route.me:
            inbox.append(own[0].new_empty(size))
            pending.append(comms.irecv(inbox[-1], ranks[src], group))
    comms.wait_all(pending)
    return inbox


def _return_weight_grads(route: Route, grad_own, grad_borrowed, group, ranks) -> None:
    """Borrowers send each borrowed expert's weight gradient home; owners add it."""
    pending, inbox = [], []
    size = sum(g[0].numel() for g in grad_own)
    for e, src, dst in route.transfers:
        if dst == route.me:
            pending.append(comms.isend(grad_borrowed[route.borrowed.index(e)], ranks[src], group))
        elif src == route.me:
            inbox.append((e, grad_own[0].new_empty(size)))
            pending.append(comms.irecv(inbox[-1][1], ranks[dst], group))
    comms.wait_all(pending)
    for e, buf in inbox:
        offset = 0
        for acc in grad_own:
            n = acc[0].numel()
            acc[route.local_index(e)] += buf[offset:offset + n].view(acc.shape[1:])
            offset += n


class MoE(nn.Module):
    """Dropless top-k mixture of SwiGLU experts, expert-parallel over ``ep_group``.

    ``ep_group=None``: no expert parallelism, every expert lives on this
    process (no communication).  Otherwise the rank at position r of
    ``ep_group`` owns experts ``[r * E_local, (r + 1) * E_local)``, and the
    expert weights are declared `Sharded` along dim 0 over the group (their
    ``state_dict()`` entries too), so checkpoints save them as parts of the
    global ``[num_experts, ...]`` tensors.  Weights are initialised for all
    experts from the current RNG and sliced, so a model built with the same
    seed holds the same experts whatever the group size.  The load-balancing
    loss (``aux_loss``) uses the slot fractions of the whole batch, counted
    over ``aux_group`` (default: the default group: every rank that trains
    on one global batch), so averaged over the ranks it is the one-process
    loss at any EP degree.  (``group=`` is the old name of ``ep_group`` and
    still accepted, with a DeprecationWarning.)

    The router's gate weights of a token (``[tokens, top_k]``): ``gating=
    "topk_softmax"`` (default) softmax over its top-k logits;
    ``"softmax_topk"`` the top-k of the softmax over all experts,
    renormalised to sum 1 when ``norm_topk`` (Mixtral, Qwen2-MoE's
    ``norm_topk_prob``).  ``router_dtype`` (e.g. torch.float32, as
    transformers' routers) computes that softmax in that dtype; the gates are
    cast back to the input's dtype.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, top_k: int, *, ep_group=None,
                 dispatcher: str = "llep", llep: LLEPConfig | None = None, aux_loss_coef: float = 0.01,
                 aux_group=None, group=_UNSET, gating: str = "topk_softmax", norm_topk: bool = True,
                 router_dtype: torch.dtype | None = None):
        super().__init__()
        if group is not _UNSET:
            if ep_group is not None:
                raise TypeError("MoE: pass ep_group= only (group= is its old name)")
            warnings.warn("MoE(group=...) is now MoE(ep_group=...): None means no expert parallelism",
                          DeprecationWarning, stacklevel=2)
            ep_group = group
        for name, value in (("dim", dim), ("hidden", hidden), ("num_experts", num_experts),
                            ("top_k", top_k)):
            _positive_int(name, value)
        if top_k > num_experts:
            raise ValueError(f"MoE top_k={top_k} must be <= num_experts={num_experts}")
        if dispatcher not in DISPATCHERS:
            raise ValueError(f"MoE dispatcher={dispatcher!r} must be one of {DISPATCHERS}")
        if gating not in GATINGS:
            raise ValueError(f"MoE gating={gating!r} must be one of {GATINGS}")
        if router_dtype is not None and not (isinstance(router_dtype, torch.dtype) and router_dtype.is_floating_point):
            raise TypeError(f"MoE router_dtype={router_dtype!r} must be a floating-point torch.dtype or None")
        if llep is not None and not isinstance(llep, LLEPConfig):
            raise TypeError(f"MoE llep={llep!r} must be an LLEPConfig or None")
        if ep_group is None:
            self.ranks, self.ep_rank = [0], 0
        else:
            import torch.distributed as dist  # only to learn this process's rank
            self.ranks, me = comms.group_ranks(ep_group), dist.get_rank()
            if me not in self.ranks:
                raise ValueError(f"MoE: this process (rank {me}) is not in the ep_group {self.ranks}")
            self.ep_rank = self.ranks.index(me)
        world = len(self.ranks)
        if num_experts % world:
            raise ValueError(f"MoE num_experts={num_experts} must divide by the ep_group size {world}")
        self.dim, self.hidden, self.num_experts, self.top_k = dim, hidden, num_experts, top_k
        self.ep_group, self.world, self.experts_per_rank = ep_group, world, num_experts // world
        self.dispatcher, self.llep = dispatcher, llep or LLEPConfig()
        self.gating, self.norm_topk, self.router_dtype = gating, bool(norm_topk), router_dtype
        self.aux_loss_coef = float(aux_loss_coef)
        self.aux_group, self.aux_ranks = aux_group, sorted(comms.group_ranks(aux_group))
        self.router = nn.Linear(dim, num_experts, bias=False)
        mine = slice(self.ep_rank * self.experts_per_rank, (self.ep_rank + 1) * self.experts_per_rank)
        self.w_gate = nn.Parameter(self._init_all(dim, hidden)[mine].clone())
        self.w_up = nn.Parameter(self._init_all(dim, hidden)[mine].clone())
        self.w_down = nn.Parameter(self._init_all(hidden, dim)[mine].clone())
        if world > 1:
            name = "ep[" + ",".join(map(str, self.ranks)) + "]"
            declare_placements(self, {w: comms.Sharded(0, self.ep_rank, world, name)
                                      for w in ("w_gate", "w_up", "w_down")})
        self.aux_loss: torch.Tensor | None = None
        self.last_stats: dict = {}
        self.last_plan: LLEPPlan | None = None

    @property
    def group(self):
        """The old name of ``ep_group``."""
        return self.ep_group

    def _batch_loads(self, local: torch.Tensor, ep_loads: torch.Tensor) -> torch.Tensor:
        """Slots per expert over the whole batch: summed over ``aux_group``
        (the EP group's sum already is that when both hold the same ranks)."""
        if not self.aux_loss_coef or self.aux_ranks == sorted(self.ranks):
            return ep_loads
        return comms.all_reduce(local.clone(), "sum", self.aux_group)

    def _init_all(self, fan_in: int, fan_out: int) -> torch.Tensor:
        bound = 1 / math.sqrt(fan_in)  # nn.Linear's default scale
        return torch.empty(self.num_experts, fan_in, fan_out).uniform_(-bound, bound)

    def expert_parameters(self) -> list[nn.Parameter]:
        """The parameters that live on one EP rank (synchronised over edp only)."""
        return [self.w_gate, self.w_up, self.w_down]

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, ep={self.world}, dispatcher={self.dispatcher!r}, gating={self.gating!r}")

    def plan(self, loads: list[int]) -> LLEPPlan:
        """This layer's plan for global per-expert loads."""
        if self.dispatcher == "llep" and self.world > 1:
            per_rank = [sum(loads[r * self.experts_per_rank:(r + 1) * self.experts_per_rank])
                        for r in range(self.world)]
            total = sum(per_rank)
            if total and max(per_rank) * self.world >= self.llep.lam * total:
                c = self.llep
                return llep_plan(loads, self.world, self.experts_per_rank, alpha=c.alpha,
                                 min_chunk=c.min_chunk, max_borrowed_experts=c.max_borrowed_experts)
        return standard_plan(loads, self.world, self.experts_per_rank)

    def _gates(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate weights ``[tokens, top_k]`` in the logits' dtype, expert ids
        ``[tokens, top_k]`` int64) by ``gating`` (see the class docstring)."""
        work = logits if self.router_dtype is None else logits.to(self.router_dtype)
        if self.gating == "topk_softmax":
            top, experts = work.topk(self.top_k, dim=-1)
            gates = torch.softmax(top, dim=-1)
        else:
            gates, experts = torch.softmax(work, dim=-1).topk(self.top_k, dim=-1)
            if self.norm_topk:
                gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates.to(logits.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        error, mine = None, ()
        try:
            if not isinstance(x, torch.Tensor) or not x.is_floating_point():
                raise TypeError(f"MoE expected a floating-point tensor, got {_kind(x)}")
            if x.dim() < 1 or x.shape[-1] != self.dim:
                raise ValueError(f"MoE expected input [..., {self.dim}], got shape {tuple(x.shape)}")
            mine = [self.dim, self.hidden, self.num_experts, self.top_k, DISPATCHERS.index(self.dispatcher),
                    dtype_code(x.dtype), dtype_code(self.w_gate.dtype)]
        except (TypeError, ValueError) as exc:
            error = exc
        if self.world > 1:  # every rank of the group learns of a bad call before any token moves
            comms.agree(error, mine, group=self.ep_group, device=x.device if x.is_cuda else None, what="MoE") \
                .same(_FIELDS, "MoE", show=_FIELDS[:4],
                                                         formats={"dispatcher": DISPATCHERS.__getitem__,
                                                                  "dtype": dtype_name, "weight dtype": dtype_name})
        elif error is not None:
            raise error
        with comms.agreed():  # the fixed sequence of this layer's collectives, agreed on above
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        shape, k = x.shape, self.top_k
        flat = x.reshape(-1, self.dim)
        logits = self.router(flat)
        gates, top_experts = self._gates(logits)
        slot_expert = top_experts.reshape(-1)
        local = torch.bincount(slot_expert, minlength=self.num_experts)
        if self.world > 1:
            counts = comms.all_gather(local, self.ep_group).view(self.world, self.num_experts)
        else:
            counts = local.view(1, -1)
        loads = counts.sum(0)
        plan = self.plan(loads.tolist())
        route = Route(counts.tolist(), plan, self.ep_rank, self.experts_per_rank)
        self.last_plan = plan

        # slots in expert order, then grouped by destination rank (stable)
        by_expert = torch.argsort(slot_expert, stable=True)
        dests = torch.tensor([d for d, _ in route.send_dest], dtype=torch.long, device=x.device)
        reps = torch.tensor([n for _, n in route.send_dest], dtype=torch.long, device=x.device)
        send_slots = by_expert[torch.argsort(torch.repeat_interleave(dests, reps), stable=True)]
        y_send = _ExpertParallel.apply(flat.index_select(0, send_slots // k), self.w_gate, self.w_up,
                                       self.w_down, route, self.ep_group, self.ranks)
        inverse = torch.empty_like(send_slots)
        inverse[send_slots] = torch.arange(send_slots.numel(), device=x.device)
        y = (y_send.index_select(0, inverse).view(-1, k, self.dim) * gates.unsqueeze(-1)).sum(1)

        # Switch-style balance loss: the whole batch's slot fractions (every rank of
        # aux_group) x this rank's mean router probability; averaged over the ranks
        # it is the one-process loss, at any EP degree
        probs = torch.softmax(logits, dim=-1)
        mean_prob = probs.sum(0) / max(flat.shape[0], 1)
        batch_loads = self._batch_loads(local, loads)
        fraction = batch_loads.to(probs.dtype) / max(int(batch_loads.sum()), 1)
        self.aux_loss = self.aux_loss_coef * self.num_experts * (fraction * mean_prob).sum()
        self.last_stats = {
            "tokens_per_expert": loads,
            "load_before": torch.tensor(standard_plan(loads.tolist(), self.world,
                                                      self.experts_per_rank).rank_loads(self.world)),
            "load_after": torch.tensor(plan.rank_loads(self.world)),
            "weights_moved": len(plan.transfers),
        }
        return y.reshape(shape)
