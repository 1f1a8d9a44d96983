"""DTensors (FSDP2-sharded parameters and AdamW moments) are checkpoint leaves.

Each rank saves its own local shard as a `Shard` of the global tensor (no
gather), and a load fills DTensor targets in place from any saved layout:
sharded at another world size, or unsharded.  The box of each DTensor is
computed from its mesh coordinate and placements (`dtensor_box`), checked
here against ``torch.chunk`` and against what FSDP2 really holds."""
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import Partial, Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard

from loom import checkpoint as ckpt
from loom import comms
from loom.checkpoint.dtensor import check_default_order, dtensor_box
from loom.checkpoint.state import flatten


# ------------------------------------------------------------ the box alone

class FakeMesh:
    """What dtensor_box reads of a DeviceMesh."""

    def __init__(self, shape, coordinate):
        self.shape, self.coordinate = tuple(shape), coordinate

    @property
    def ndim(self):
        return len(self.shape)

    def size(self, i):
        return self.shape[i]

    def get_coordinate(self):
        return self.coordinate


def _chunked(global_shape, mesh_shape, placements, coordinate):
    """The reference: torch.chunk of an arange tensor, mesh dim by mesh dim."""
    piece = torch.arange(math.prod(global_shape)).reshape(global_shape)
    for i, p in enumerate(placements):
        if p.is_shard():
            pieces = torch.chunk(piece, mesh_shape[i], dim=p.dim)
            c = coordinate[i]
            piece = pieces[c] if c < len(pieces) else piece.narrow(p.dim, piece.shape[p.dim], 0)
    return piece


@pytest.mark.parametrize("global_shape,mesh_shape,placements", [
    ((7, 5), (3,), (Shard(0),)),                  # 3, 3, 1 rows
    ((3, 7), (4,), (Shard(0),)),                  # 1, 1, 1, 0: an empty box
    ((5,), (4,), (Shard(0),)),                    # 2, 2, 1, 0 (torch.chunk makes 3 pieces)
    ((7, 4), (2, 3), (Replicate(), Shard(0))),    # replicas over mesh dim 0
    ((7, 4), (2, 3), (Shard(1), Shard(0))),
    ((7, 4), (2, 3), (Shard(0), Shard(0))),       # one dim cut twice: 4 -> 2,2,0; 3 -> 1,1,1
    ((2, 3), (2, 2), (Shard(-1), Replicate())),   # a negative shard dim
    ((), (3,), (Replicate(),)),                   # a scalar
])
def test_dtensor_box_is_torch_chunk_applied_in_mesh_dim_order(global_shape, mesh_shape, placements):
    reference = torch.arange(math.prod(global_shape)).reshape(global_shape)
    normal = [Shard(p.dim % len(global_shape)) if p.is_shard() else p for p in placements]
    covered = torch.zeros(global_shape, dtype=torch.int64)
    replicas = math.prod(n for n, p in zip(mesh_shape, placements) if p.is_replicate())
    for coordinate in itertools.product(*(range(n) for n in mesh_shape)):
        offsets, sizes = dtensor_box(global_shape, FakeMesh(mesh_shape, list(coordinate)), placements)
        assert len(offsets) == len(sizes) == len(global_shape)
        box = tuple(slice(o, o + n) for o, n in zip(offsets, sizes))
        expected = _chunked(global_shape, mesh_shape, normal, coordinate)
        assert tuple(sizes) == tuple(expected.shape), coordinate
        assert torch.equal(reference[box], expected), coordinate
        assert all(o + n <= g for o, n, g in zip(offsets, sizes, global_shape))
        covered[box] += 1
    assert torch.all(covered == replicas)  # the boxes tile the tensor, once per replica


def test_dtensor_box_uneven_and_empty_boxes_by_hand():
    boxes = [dtensor_box((7, 5), FakeMesh((3,), [c]), [Shard(0)]) for c in range(3)]
    assert boxes == [((0, 0), (3, 5)), ((3, 0), (3, 5)), ((6, 0), (1, 5))]
    boxes = [dtensor_box((3,), FakeMesh((4,), [c]), [Shard(0)]) for c in range(4)]
    assert boxes == [((0,), (1,)), ((1,), (1,)), ((2,), (1,)), ((3,), (0,))]
    assert dtensor_box((0, 2), FakeMesh((2,), [1]), [Shard(0)]) == ((0, 0), (0, 2))


def test_dtensor_box_outside_the_mesh_holds_nothing():
    assert dtensor_box((7, 5), FakeMesh((3,), None), [Shard(0)]) is None


@pytest.mark.parametrize("placement,match", [
    (Partial(), r"'model/w'.*Partial.*reduce it first"),
    (_StridedShard(0, split_factor=2), r"'model/w'.*_StridedShard.*not support"),
])
def test_dtensor_box_refuses_partial_and_strided_naming_the_key(placement, match):
    with pytest.raises(TypeError, match=match):
        dtensor_box((8, 2), FakeMesh((2, 2), [0, 1]), [Replicate(), placement], key="model/w")


def test_dtensor_box_refuses_bad_placements_with_clear_errors():
    with pytest.raises(ValueError, match="2 placements for a 1-d mesh"):
        dtensor_box((4,), FakeMesh((2,), [0]), [Shard(0), Shard(0)], key="w")
    with pytest.raises(ValueError, match=r"'w'.*has no dim 2"):
        dtensor_box((4, 3), FakeMesh((2,), [0]), [Shard(2)], key="w")


def test_a_dim_sharded_over_mesh_dims_out_of_order_is_refused():
    def spec(*entries):
        return SimpleNamespace(_spec=SimpleNamespace(shard_order=tuple(
            SimpleNamespace(tensor_dim=d, mesh_dims=m) for d, m in entries)))

    check_default_order(spec((0, (0, 1)), (1, (2,))), key="w")  # mesh dim order: fine
    check_default_order(SimpleNamespace(), key="w")             # a spec without an order: fine
    with pytest.raises(TypeError, match=r"'w'.*tensor dim 0 over mesh dims \(1, 0\)"):
        check_default_order(spec((0, (1, 0))), key="w")


# --------------------------------------------------------- FSDP2 end to end

def _mlp(seed: int) -> nn.Module:
    """7 and 3 rows: uneven over 2, 3 and 4 ranks (over 4, the last layer's rows are 1, 1, 1, 0)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()


def _fsdp2(model: nn.Module, group=None) -> nn.Module:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    mesh = DeviceMesh.from_group(group or dist.group.WORLD, "cpu")
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, dtype=torch.float64, generator=g)


def _train_step(model, opt, seed: int = 1):
    opt.zero_grad(set_to_none=True)
    model(_batch(seed)).pow(2).sum().backward()
    opt.step()


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach().clone()


def _snapshot(model, opt) -> dict:
    """Full (gathered) parameters, AdamW moments and steps, by parameter name."""
    out = {}
    for name, p in model.named_parameters():
        out[name] = _full(p.detach())
        for k, v in opt.state[p].items():
            out[f"{name}:{k}"] = _full(v)
    out["output"] = _full(model(_batch(7)).detach())  # what the (re-gathered) parameters compute
    return out


def _save_sharded(url: str, async_save: bool = False) -> dict:
    model = _fsdp2(_mlp(0))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    _train_step(model, opt)
    state = {"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt)}

    # every leaf is a Shard whose tensor aliases the live parameter / moment
    leaves = {leaf.key: leaf for leaf in flatten(state)}
    for name, p in model.named_parameters():
        leaf = leaves[f"model/{name}"]
        assert leaf.kind == "shard" and leaf.obj.global_shape == tuple(p.shape)
        local = p.to_local()
        assert leaf.tensor.shape == local.shape
        if local.numel():
            assert leaf.tensor.data_ptr() == local.data_ptr()
    before = _snapshot(model, opt)
    if async_save:
        with ckpt.AsyncCheckpointer(url) as saver:
            saver.attach(opt)
            handle = saver.save(state, step=1)
            _train_step(model, opt, seed=2)  # runs after the snapshot: the checkpoint keeps step 1's values
            handle.result()
        assert not torch.equal(_snapshot(model, opt)["0.weight"], before["0.weight"])
    else:
        ckpt.save(state, url, step=1)
    return before


def _load_sharded(url: str) -> dict:
    model = _fsdp2(_mlp(1))  # other values than the saved ones
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt, init=True)}
    info = ckpt.load(state, url)
    in_place = _snapshot(model, opt)  # the load wrote into the live parameters and moments
    opt.load_state_dict(state["optim"])
    after = _snapshot(model, opt)
    assert after.keys() == in_place.keys() and all(torch.equal(after[k], in_place[k]) for k in after)
    return {"snapshot": in_place, "info": (info.step, info.world_size),
            "local_rows": [tuple(p.to_local().shape) for p in model.parameters()]}


def _plain_model_and_opt(seed: int):
    model = _mlp(seed)
    return model, torch.optim.AdamW(model.parameters(), lr=0.1)


def _assert_equal(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.timeout(120)
def test_fsdp2_saved_at_3_loads_unsharded_and_at_2_and_4(distributed, tmp_path):
    url = f"file://{tmp_path}/ckpt"
    saved = distributed(_save_sharded, 3, url)[0]
    manifest = ckpt.CheckpointStore(url).read_manifest(1)
    w = manifest.tensors["model/0.weight"]
    assert w.placement == "shard" and w.shape == (7, 5)
    assert sorted(f.box for f in w.fragments) == [((0, 0), (3, 5)), ((3, 0), (6, 5)), ((6, 0), (7, 5))]
    assert manifest.tensors["optim/state/2/exp_avg"].placement == "shard"

    # (a) unsharded, one process
    model, opt = _plain_model_and_opt(1)
    state = {"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt, init=True)}
    ckpt.load(state, url)
    opt.load_state_dict(state["optim"])
    _assert_equal(_snapshot(model, opt), saved)

    # (b) sharded at another world size (at 4 the last layer has an empty shard)
    for world, rows in ((2, [(4, 5), (4,), (2, 7), (2,)]), (4, [(2, 5), (2,), (1, 7), (1,)])):
        results = distributed(_load_sharded, world, url)
        assert results[0]["local_rows"] == rows
        if world == 4:
            assert results[3]["local_rows"][2:] == [(0, 7), (0,)]
        for r in results:
            assert r["info"] == (1, 3)
            _assert_equal(r["snapshot"], saved)


@pytest.mark.timeout(120)
def test_unsharded_checkpoint_loads_into_fsdp2_and_training_continues_alike(distributed, tmp_path):
    url = f"file://{tmp_path}/ckpt"
    model, opt = _plain_model_and_opt(0)
    _train_step(model, opt)
    saved = _snapshot(model, opt)
    ckpt.save({"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt)}, url, step=1)
    _train_step(model, opt, seed=2)
    after = _snapshot(model, opt)
    for r in distributed(_load_then_step, 4, url):
        _assert_equal(r["loaded"], saved)
        for k in after:  # the sharded step equals the unsharded one
            assert torch.allclose(r["stepped"][k], after[k], rtol=1e-12, atol=1e-14), k


def _load_then_step(url: str) -> dict:
    model = _fsdp2(_mlp(1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    state = {"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt, init=True)}
    ckpt.load(state, url)
    opt.load_state_dict(state["optim"])
    loaded = _snapshot(model, opt)
    _train_step(model, opt, seed=2)
    return {"loaded": loaded, "stepped": _snapshot(model, opt)}


@pytest.mark.timeout(120)
def test_async_save_of_fsdp2_keeps_the_values_at_save(distributed, tmp_path):
    url = f"file://{tmp_path}/ckpt"
    saved = distributed(_save_sharded, 3, url, True)[0]
    model, opt = _plain_model_and_opt(1)
    state = {"model": model.state_dict(), "optim": ckpt.optimizer_state_dict(opt, init=True)}
    ckpt.load(state, url)
    opt.load_state_dict(state["optim"])
    _assert_equal(_snapshot(model, opt), saved)


# ------------------------------------------ loom placement inside FSDP2 shards

class Experts(nn.Module):
    """This rank's slice (3 of 6 rows) of an expert weight."""

    def __init__(self, index: int, seed: int):
        super().__init__()
        torch.manual_seed(seed + index)
        self.w = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))

    def forward(self, x):
        return x @ self.w.T


def _experts_sharded(url: str, save: bool) -> dict:
    """4 ranks: expert slice ``index = rank % 2`` (Sharded(0, index, 2)), and
    FSDP2 shards it further over the ranks holding the same slice ({0, 2},
    {1, 3}): rows 2 and 1."""
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import fully_shard

    from loom.parallel import declare_placements

    rank = dist.get_rank()
    index = rank % 2
    groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    module = Experts(index, seed=0 if save else 10)
    placement = comms.Sharded(0, index, 2, "ep")
    declare_placements(module, {"w": placement})
    fully_shard(module, mesh=DeviceMesh.from_group(groups[index], "cpu"))
    declare_placements(module, {"w": placement})  # the DTensor parameter that FSDP2 put in place
    opt = torch.optim.AdamW(module.parameters(), lr=0.1)
    if save:
        opt.zero_grad()
        module(_batch()[:, :4]).pow(2).sum().backward()
        opt.step()
        state = {"model": module.state_dict(), "optim": ckpt.optimizer_state_dict(opt)}
        leaf = {leaf.key: leaf for leaf in flatten(state)}["optim/state/0/exp_avg"]
        assert leaf.obj.global_shape == (6, 4)
        assert leaf.obj.offsets == (3 * index + 2 * (rank // 2), 0)  # the FSDP2 box inside the loom slice
        ckpt.save(state, url, step=1)
    else:
        state = {"model": module.state_dict(), "optim": ckpt.optimizer_state_dict(opt, init=True)}
        ckpt.load(state, url)
        opt.load_state_dict(state["optim"])
    # torch's own box of each local shard (an independent reference), to assemble the [3, 4] slices
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    w = module.w.detach()
    _, offsets = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
    shard = flatten(module.state_dict())[0].obj  # the state dict's entry carries the placement (a hook)
    return {"index": index, "box": (shard.offsets, tuple(shard.tensor.shape)), "offsets": tuple(offsets),
            "w": w.to_local().clone(), "exp_avg": opt.state[module.w]["exp_avg"].to_local().clone(),
            "exp_avg_sq": opt.state[module.w]["exp_avg_sq"].to_local().clone()}


def _slices(results) -> dict:
    """The [3, 4] slice of each index, from its ranks' local shards."""
    out = {}
    for r in results:
        for k in ("w", "exp_avg", "exp_avg_sq"):
            full = out.setdefault((r["index"], k), torch.full((3, 4), float("nan"), dtype=torch.float64))
            full[r["offsets"][0]:r["offsets"][0] + r[k].shape[0]] = r[k]
    return out


@pytest.mark.timeout(120)
def test_loom_placement_composes_with_fsdp2_shards(distributed, tmp_path):
    url = f"file://{tmp_path}/ckpt"
    saved = distributed(_experts_sharded, 4, url, True)
    assert [r["box"] for r in saved] == [((0, 0), (2, 4)), ((3, 0), (2, 4)), ((2, 0), (1, 4)),
                                         ((5, 0), (1, 4))]
    slices = _slices(saved)
    full = {k: torch.cat([slices[(0, k)], slices[(1, k)]]) for k in ("w", "exp_avg", "exp_avg_sq")}
    assert not any(t.isnan().any() for t in full.values())
    manifest = ckpt.CheckpointStore(url).read_manifest(1)
    assert sorted(f.lo for f in manifest.tensors["model/w"].fragments) == [(0, 0), (2, 0), (3, 0), (5, 0)]
    # in one process: the global [6, 4] tensors
    w = torch.zeros(6, 4, dtype=torch.float64)
    moments = {"exp_avg": torch.zeros_like(w), "exp_avg_sq": torch.zeros_like(w)}
    ckpt.load({"model": {"w": w}, "optim": {"state": {0: moments}}}, url, strict=False)
    assert torch.equal(w, full["w"])
    for k, v in moments.items():
        assert torch.equal(v, full[k]), k
    # back into the same composed layout, from other initial values
    loaded = _slices(distributed(_experts_sharded, 4, url, False))
    assert loaded.keys() == slices.keys()
    for key in slices:
        assert torch.equal(loaded[key], slices[key]), key


# ----------------------------------------------------- edges through save/load

def _edges(url: str) -> dict:
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.tensor import DTensor

    out = {}
    world = DeviceMesh.from_group(dist.group.WORLD, "cpu")
    partial = DTensor.from_local(torch.ones(2, 3, dtype=torch.float64), world, [Partial()])
    for name, state in (("partial", {"model": {"w": partial}}),
                        ("per_rank", {"rng": ckpt.PerRank(DTensor.from_local(torch.ones(2), world, [Shard(0)]))})):
        try:
            ckpt.save(state, url, step=1)
        except TypeError as exc:
            out[name] = str(exc)
    # local shards that are not torch.chunk's split (5 + 2 rows of 7): refused, not mislaid
    rows = 5 if dist.get_rank() == 0 else 2
    odd = DTensor.from_local(torch.ones(rows, 2), world, [Shard(0)], shape=(7, 2), stride=(2, 1))
    try:
        ckpt.save({"odd": odd}, url, step=1)
    except ValueError as exc:
        out["odd"] = str(exc)
    # a DTensor on a mesh of rank 0 only: rank 1 holds nothing of it (and its scalar sibling)
    only0 = DeviceMesh("cpu", [0])
    w = DTensor.from_local(torch.arange(6, dtype=torch.float64).reshape(3, 2), only0, [Replicate()])
    s = DTensor.from_local(torch.tensor(2.5, dtype=torch.float64), only0, [Replicate()])
    ckpt.save({"w": w, "s": s}, url, step=2)
    w2 = DTensor.from_local(torch.zeros(3, 2, dtype=torch.float64), only0, [Replicate()])
    s2 = DTensor.from_local(torch.zeros((), dtype=torch.float64), only0, [Replicate()])
    ckpt.load({"w": w2, "s": s2}, url, step=2)
    out["loaded"] = (w2.to_local().clone(), s2.to_local().clone())
    return out


@pytest.mark.timeout(60)
def test_partial_per_rank_and_outside_the_mesh_through_save_and_load(distributed, tmp_path):
    url = f"file://{tmp_path}/ckpt"
    results = distributed(_edges, 2, url)
    for r in results:  # every rank raises the same error, naming the key
        assert "'model/w'" in r["partial"] and "Partial" in r["partial"]
        assert "'rng'" in r["per_rank"] and "PerRank" in r["per_rank"]
        assert "'odd'" in r["odd"] and "torch.chunk" in r["odd"]
    w, s = results[0]["loaded"]
    assert torch.equal(w, torch.arange(6, dtype=torch.float64).reshape(3, 2)) and s.item() == 2.5
    assert results[1]["loaded"][0].numel() == 0  # rank 1 holds nothing
    fragments = ckpt.CheckpointStore(url).read_manifest(2).tensors["w"].fragments
    assert [f.jsonable() for f in fragments] == [[0, [0, 0], [3, 2]]]
