"""DeepSpeed's checkpoint engine through loom (`loom.checkpoint.deepspeed_engine`):
the tagged-JSON skeleton, the pointer checks, and ZeRO-1 / bf16 runs on 2
gloo ranks that save, load back and continue like an uninterrupted run."""
import collections
import json
import os
import pickle
import types

import numpy as np
import pytest
import torch
import torch.distributed as dist

from loom import checkpoint as ckpt
from loom.checkpoint import InvalidCheckpointError
from loom.checkpoint.store import CheckpointStore

from helpers import assert_same

from loom.checkpoint import deepspeed_engine as ds_engine  # noqa: E402
from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler  # noqa: E402
from deepspeed.runtime.zero.config import ZeroStageEnum  # noqa: E402
from deepspeed.utils.tensor_fragment import fragment_address  # noqa: E402

FILE = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def _skeleton(doc) -> dict:
    """A packed file whose skeleton is ``doc`` (JSON text or a JSON-able value)."""
    text = doc if isinstance(doc, (str, bytes)) else json.dumps(doc)
    data = text.encode() if isinstance(text, str) else text
    return {"skeleton_json": torch.frombuffer(bytearray(data), dtype=torch.uint8)}


def _root(node) -> dict:
    return _skeleton({"format": "loom.deepspeed-skeleton", "version": 1, "root": node})


# ------------------------------------------------------------ the skeleton

def test_skeleton_round_trips_what_deepspeed_saves():
    dynamic = DynamicLossScaler(2.0 ** 16, 1000, 1, 2, False)
    state = {
        "module": collections.OrderedDict([("w", torch.arange(6.0).reshape(2, 3)), ("b", torch.ones(2))]),
        "optimizer_state_dict": {
            "loss_scaler": LossScaler(1.0), "dynamic": dynamic, "zero_stage": ZeroStageEnum.gradients,
            "base_optimizer_state": {"state": {0: {"step": torch.tensor(2.0), "exp_avg": torch.zeros(4)}},
                                     "param_groups": [{"lr": 1e-2, "betas": (0.9, 0.999), "foreach": None}]},
            "param_slice_mappings": [collections.OrderedDict([("w", fragment_address(numel=4, start=0))])],
            "partition_count": [2]},
        "param_shapes": [collections.OrderedDict([("w", torch.Size([2, 3]))])],
        "odd": {(1, "a"): {3, 4}, 5: frozenset({"x"}), "nan": float("nan"), "inf": float("-inf"),
                "raw": b"\x00\xff", "dtype": torch.bfloat16, "none": None, "flag": True},
    }
    packed = ds_engine.pack(state, FILE)
    assert set(packed) == {"skeleton_json", "tensors"} and len(packed["tensors"]) == 4
    doc = json.loads(packed["skeleton_json"].numpy().tobytes())  # plain JSON: no pickle anywhere
    assert doc["format"] == "loom.deepspeed-skeleton" and doc["version"] == 1
    back = ds_engine.unpack(packed, FILE)
    assert_same(state, back, exact_types=True)
    assert back["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.gradients
    assert back["optimizer_state_dict"]["dynamic"].dtype is torch.half
    assert back["odd"]["dtype"] is torch.bfloat16


@pytest.mark.parametrize("state, where, what", [
    ({"client": {"x": [1, object()]}}, "client/x/1", "builtins.object"),
    ({"client": {"n": np.float32(1.0)}}, "client/n", "numpy.float32"),
    ({"client": collections.defaultdict(int)}, "client", "collections.defaultdict"),
    ({"client": {torch.zeros(1): 1}}, "client/tensor([0.])", "a dict key"),
    ({"client": types.SimpleNamespace(a=1)}, "client", "types.SimpleNamespace"),
])
def test_pack_refuses_what_the_skeleton_cannot_hold(state, where, what):
    with pytest.raises(TypeError) as err:
        ds_engine.pack(state, FILE)
    message = str(err.value)
    assert FILE in message and what in message and "\n" not in message
    assert f"'{where}'" in message


def test_pack_refuses_an_unknown_field_and_a_cycle():
    scaler = LossScaler(1.0)
    scaler.hook = print
    with pytest.raises(TypeError, match=r"'loss_scaler/hook'.*a field of deepspeed\..*LossScaler"):
        ds_engine.pack({"loss_scaler": scaler}, FILE)
    cycle = []
    cycle.append(cycle)
    with pytest.raises(TypeError, match="nested more than 64 levels"):
        ds_engine.pack({"c": cycle}, FILE)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("packed, match", [
    (_root({"$": "object", "class": "deepspeed.io.py_file_writer.PyFileWriter", "fields": {}}),
     "class 'deepspeed.io.py_file_writer.PyFileWriter' is not one loom loads"),
    (_root({"$": "enum", "class": "enum.Enum", "name": "x"}), "enum class 'enum.Enum' is not one"),
    (_root({"$": "enum", "class": "deepspeed.runtime.zero.config.ZeroStageEnum", "name": "__class__"}),
     "'__class__' is not a member"),
    (_root({"$": "object", "class": "deepspeed.runtime.fp16.loss_scaler.LossScaler", "fields": {"__class__": 1}}),
     "has no field '__class__'"),
    (_root({"$": "pickle", "data": ""}), "unknown node 'pickle'"),
    (_root({"$": "dict", "items": [[{"$": "tensor", "index": 0}, 1]]}), "cannot be a dict key"),
    (_root({"$": "dict", "items": [["t", {"$": "tensor", "index": 3}]]}), "tensor index 3 is not one"),
    (_root({"$": "dict", "items": [["s", {"$": "size", "dims": [-1]}]]}), "non-negative ints"),
    (_root({"$": "dict", "items": [["d", {"$": "dtype", "name": "__builtins__"}]]}), "unknown dtype"),
    (_root({"$": "dict", "items": [["f", {"$": "float", "value": "1e999999"}]]}), "not one of"),
    (_root({"$": "dict", "items": [], "extra": 1}), "expected"),
    (_root([1, 2]), "root is a list"),
    (_root({"$": "dict", "items": [["x", [[[[[[1]]]]]]]]}), None),
    (_skeleton("[" * 200_000 + "]" * 200_000), "not valid JSON"),
    (_skeleton('{"format": "loom.deepspeed-skeleton", "version": 1, "root": NaN}'), "not valid JSON"),
    (_skeleton('{"format": "loom.deepspeed-skeleton", "version": 1, "root": ' + "9" * 100_000 + "}"),
     "not valid JSON"),
    (_skeleton(b"\x80\x04\x95"), "not valid JSON"),
    (_skeleton({"format": "loom.deepspeed-skeleton", "version": 99, "root": {}}), "version 99"),
    ({"skeleton": torch.zeros(3, dtype=torch.uint8)}, "older loom that pickled"),
    ({"skeleton_json": torch.zeros(3), "tensors": {}}, "1-D uint8"),
    ({**_root({"$": "dict", "items": []}), "tensors": {"1": torch.zeros(1)}}, "named 0..n-1"),
])
def test_unpack_refuses_hostile_or_damaged_skeletons(packed, match):
    if match is None:  # a well-formed control case among the hostile ones
        assert ds_engine.unpack(packed, FILE) == {"x": [[[[[[1]]]]]]}
        return
    with pytest.raises(InvalidCheckpointError, match=match) as err:
        ds_engine.unpack(packed, FILE)
    assert err.value.file == FILE and "\n" not in str(err.value)


def test_unpack_bounds_depth():
    node = 1
    for _ in range(ds_engine.MAX_DEPTH + 2):
        node = [node]
    with pytest.raises(InvalidCheckpointError, match="nested more than 64 levels"):
        ds_engine.unpack(_root({"$": "dict", "items": [["deep", node]]}), FILE)


# --------------------------------------------------- hostile stores and pointers

def _evil_pickle(victim) -> bytes:
    """A pickle whose loading calls DeepSpeed's PyFileWriter(victim), which
    opens ``victim`` for writing (truncating it): the old skeleton unpickler
    let any class of any deepspeed module through."""
    return (b"cdeepspeed.io.py_file_writer\nPyFileWriter\n(" + pickle.dumps(str(victim), protocol=0)[:-1]
            + b"tR.")


def _store_with(save_dir, files: dict, step=3, url=None):
    """A loom store as the engine lays it out, with ``files`` as given and
    pointers to them; returns the pointer paths."""
    url = url or os.path.join(os.path.abspath(save_dir), "loom")  # the engine's default
    ckpt.save({"deepspeed": {"tag": f"global_step{step}"}, **files}, url, step=step)
    tag_dir = os.path.join(save_dir, f"global_step{step}")
    os.makedirs(tag_dir, exist_ok=True)
    paths = {}
    for name in files:
        paths[name] = os.path.join(tag_dir, name)
        with open(paths[name], "w") as fh:
            json.dump({"format": ds_engine.POINTER_FORMAT, "url": url, "step": step, "file": name}, fh)
    return paths


def _engine(url=None):
    return ds_engine.LoomCheckpointEngine(types.SimpleNamespace(global_steps=0), url)


def test_load_of_a_hostile_skeleton_pickle_never_runs_it(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    evil = torch.frombuffer(bytearray(_evil_pickle(victim)), dtype=torch.uint8)
    paths = _store_with(str(tmp_path / "ds"), {FILE: {"skeleton": evil}})
    with pytest.raises(InvalidCheckpointError, match="older loom that pickled"):
        _engine().load(paths[FILE])
    assert victim.read_text() == "precious"


def test_load_follows_only_a_pointer_to_its_own_store(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    own = str(tmp_path / "ds" / "loom")
    paths = _store_with(str(tmp_path / "ds"), {FILE: {"tensors": {"0": torch.ones(2)}}})
    # a store elsewhere that the old loader followed, holding a hostile pickle
    evil = torch.frombuffer(bytearray(_evil_pickle(victim)), dtype=torch.uint8)
    elsewhere = str(tmp_path / "elsewhere")
    ckpt.save({FILE: {"skeleton": evil}}, elsewhere, step=3)
    pointer = {"format": "loom.deepspeed-pointer", "url": elsewhere, "step": 3, "file": FILE}
    bad = [({**pointer}, "url", "names the store"),
           ({**pointer, "url": own, "file": "other.pt"}, "file", "not its own name"),
           ({**pointer, "url": own, "step": -3}, "step", "non-negative"),
           ({**pointer, "url": own, "step": True}, "step", "non-negative"),
           ({**pointer, "url": own, "step": "3"}, "step", "non-negative"),
           ({**pointer, "extra": 1}, None, "has the fields"),
           ({**pointer, "format": "other"}, "format", "not a loom pointer"),
           (" " * ((64 << 10) + 1), None, "larger than")]
    for doc, field, match in bad:
        with open(paths[FILE], "w") as fh:
            fh.write(doc if isinstance(doc, str) else json.dumps(doc))
        with pytest.raises(InvalidCheckpointError, match=match) as err:
            _engine().load(paths[FILE])
        assert err.value.field == field and "\n" not in str(err.value), doc
    # the configured url is this engine's store; the pickled skeleton there is refused
    with open(paths[FILE], "w") as fh:
        json.dump(pointer, fh)
    with pytest.raises(InvalidCheckpointError, match="older loom that pickled"):
        _engine(url=elsewhere).load(paths[FILE])
    assert victim.read_text() == "precious"
    # and a good file in its own store loads (by its url, or a file:// url of the same place)
    good = ds_engine.pack({"a": torch.ones(2), "zero_stage": ZeroStageEnum.optimizer_states}, FILE)
    paths = _store_with(str(tmp_path / "ds"), {FILE: good}, step=4)
    assert _engine().load(paths[FILE])["zero_stage"] is ZeroStageEnum.optimizer_states
    assert torch.equal(_engine(url=f"file://{own}/").load(paths[FILE])["a"], torch.ones(2))


def test_load_bounds_the_skeleton_before_reading_it(tmp_path, monkeypatch):
    paths = _store_with(str(tmp_path / "ds"), {FILE: ds_engine.pack({"pad": "x" * 3000}, FILE)})
    monkeypatch.setattr(ds_engine, "MAX_SKELETON_BYTES", 1024)
    with pytest.raises(InvalidCheckpointError, match="not at most 1024 uint8 bytes"):
        _engine().load(paths[FILE])
    os.remove(paths[FILE])
    with pytest.raises(FileNotFoundError):
        _engine().load(paths[FILE])


# ------------------------------------------------------- DeepSpeed on 2 ranks

def _make(stage=1, bf16=False):
    import deepspeed
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "steps_per_print": 10**6,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01, "torch_adam": True}}}
    if bf16:
        config["bf16"] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    return engine


def _train(engine, steps):
    rank, losses = dist.get_rank(), []
    dtype = next(engine.module.parameters()).dtype
    for s in steps:
        x = torch.randn(2, 5, generator=torch.Generator().manual_seed(100 * rank + s)).to(dtype)
        loss = engine(x).float().pow(2).sum()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return losses


def _deepspeed_round_trip(root):
    """ZeRO-1 on 2 gloo ranks: an uninterrupted run, a run that saves
    through loom after 3 steps and steps on at once, and a fresh engine that
    loads the save and continues.  Then a client_state loom cannot store,
    and a bf16 ZeRO-2 engine's save and load."""
    rank = dist.get_rank()
    reference = _train(_make(), range(6))
    engine = _make()
    loom_engine = ckpt.install_deepspeed_engine(engine, keep_last=2)
    losses = _train(engine, range(3))
    engine.save_checkpoint(root, client_state={"note": "ok", "lr_history": (1e-2, float("inf"))})
    losses += _train(engine, range(3, 6))    # the next optimizer step mutates them at once
    loom_engine.wait()
    dist.barrier()
    with open(os.path.join(root, "latest")) as fh:
        latest = fh.read()
    pointer = os.path.join(root, "global_step3", f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    zero = loom_engine.load(pointer, map_location="cpu")
    fresh = _make()
    ckpt.install_deepspeed_engine(fresh)
    path, client = fresh.load_checkpoint(root)
    resumed = _train(fresh, range(3, 6))

    # an object loom cannot store: a TypeError from save_checkpoint on every rank, nothing saved
    try:
        engine.save_checkpoint(root, client_state={"handle": object()})
        refused = None
    except TypeError as exc:
        refused = str(exc)
    loom_engine.wait()

    # bf16 (ZeRO-2): DeepSpeed's bf16_zero_pp_rank_* files through loom
    half = _make(stage=2, bf16=True)
    ckpt.install_deepspeed_engine(half)
    _train(half, range(2))
    half.save_checkpoint(f"{root}/bf16")
    half.checkpoint_engine.wait()
    back = _make(stage=2, bf16=True)
    ckpt.install_deepspeed_engine(back)
    back.load_checkpoint(f"{root}/bf16")
    bf16_same = all(torch.equal(a, b) for a, b in zip(half.optimizer.single_partition_of_fp32_groups,
                                                       back.optimizer.single_partition_of_fp32_groups))
    bf16_next = (_train(half, [7]), _train(back, [7]))
    for e in (engine, fresh, half, back):
        e.destroy()
    return {"reference": reference, "losses": losses, "resumed": resumed, "latest": latest, "path": path,
            "client": {k: client.get(k) for k in ("note", "lr_history")},
            "zero_keys": sorted(zero["optimizer_state_dict"]),
            "scaler": type(zero["optimizer_state_dict"]["loss_scaler"]).__name__,
            "steps": CheckpointStore(f"{root}/loom").committed_steps(), "refused": refused,
            "bf16_same": bf16_same, "bf16_next": bf16_next,
            "bf16_files": sorted(os.listdir(f"{root}/bf16/global_step2"))}


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_deepspeed_zero1_saves_through_loom_and_continues_identically(tmp_path):
    from loom.comms.testing import run_distributed
    results = run_distributed(_deepspeed_round_trip, 2, str(tmp_path), timeout=500, env={"DS_ACCELERATOR": "cpu"})
    for rank, out in enumerate(results):
        assert out["losses"] == out["reference"]            # saving does not perturb training
        assert out["resumed"] == out["reference"][3:]       # bitwise: the same floats
        assert out["latest"] == "global_step3" and "global_step3" in out["path"]
        assert out["client"] == {"note": "ok", "lr_history": (1e-2, float("inf"))}
        assert "single_partition_of_fp32_groups" in out["zero_keys"] and "loss_scaler" in out["zero_keys"]
        assert out["scaler"] == "LossScaler"
        assert out["steps"] == [3]                          # the refused save left nothing
        assert out["refused"] is not None and "'handle'" in out["refused"] and "builtins.object" in out["refused"]
        assert out["refused"].startswith("rank 0: TypeError") == (rank == 1)
        assert out["bf16_same"] and out["bf16_next"][0] == out["bf16_next"][1]
        assert "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt" in out["bf16_files"]
