"""Tensor kinds a checkpoint cannot hold exactly are refused up front, naming
the key (sync and async saves); plain tensors of every dtype round-trip."""
import pytest
import torch

from loom import checkpoint as ckpt

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _kinds():
    q = torch.quantize_per_tensor(torch.tensor([0.5, -1.25, 3.0]), scale=0.25, zero_point=3, dtype=torch.quint8)
    sparse = torch.tensor([[0.0, 2.0], [3.0, 0.0]]).to_sparse()
    meta = torch.empty(3, device="meta")
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)])
    return {"quantized": (q, "quantized"), "sparse": (sparse, "layout torch.sparse_coo"),
            "meta": (meta, "meta device"), "nested": (nested, "nested")}


@pytest.mark.parametrize("kind", ["quantized", "sparse", "meta", "nested"])
def test_unsupported_tensor_kinds_are_refused_naming_the_key(tmp_path, kind):
    tensor, why = _kinds()[kind]
    state = {"model": {"layer": {"w": tensor}}, "ok": torch.ones(2)}
    with pytest.raises(TypeError, match=rf"key 'model/layer/w'.*{why}"):
        ckpt.save(state, str(tmp_path / "sync"), step=0)
    with ckpt.AsyncCheckpointer(str(tmp_path / "async")) as saver:
        with pytest.raises(TypeError, match=rf"key 'model/layer/w'.*{why}"):
            saver.save(state, step=0)  # refused in save() itself: no background thread touches it
    assert ckpt.CheckpointStore(str(tmp_path / "sync")).steps() == []
    assert ckpt.CheckpointStore(str(tmp_path / "async")).steps() == []


def test_wrapped_fragments_are_checked_too(tmp_path):
    q = _kinds()["quantized"][0]
    with pytest.raises(TypeError, match=r"key 'part'.*quantized"):
        ckpt.save({"part": ckpt.Shard(q, (3,), (0,))}, str(tmp_path / "s"), step=0)


def test_a_quantized_tensor_saved_by_its_parts_round_trips(tmp_path):
    """What the error message recommends works, exactly."""
    q = _kinds()["quantized"][0]
    ckpt.save({"q": {"int": q.int_repr(), "scale": q.q_scale(), "zero_point": q.q_zero_point()}},
              str(tmp_path / "q"), step=0)
    back = {"q": {"int": torch.zeros(3, dtype=torch.uint8), "scale": 0.0, "zero_point": 0}}
    ckpt.load(back, str(tmp_path / "q"))
    again = torch._make_per_tensor_quantized_tensor(back["q"]["int"], back["q"]["scale"], back["q"]["zero_point"])
    assert torch.equal(again.dequantize(), q.dequantize())


def _nested(depth, leaf):
    value = leaf
    for i in range(depth):
        value = {i: (value,)}  # a tagged dict around a tagged tuple: the deepest JSON per level
    return value


def test_values_nested_too_deep_for_loading_are_refused_at_save(tmp_path):
    """A saved value must be loadable: its JSON stays within the reader's depth limit."""
    from loom.checkpoint.state import MAX_VALUE_DEPTH
    with pytest.raises(TypeError, match=r"key 'cfg/99/98/.*nested more than 100 levels"):
        ckpt.save({"cfg": _nested(MAX_VALUE_DEPTH, 1)}, str(tmp_path / "deep"), step=0)
    ok = _nested(MAX_VALUE_DEPTH // 2 - 1, 7)
    ckpt.save({"cfg": ok, "w": torch.ones(1)}, str(tmp_path / "fine"), step=0)
    back = {"cfg": None, "w": torch.zeros(1)}
    ckpt.load(back, str(tmp_path / "fine"))
    assert back["cfg"] == ok


@pytest.mark.parametrize("make,match", [
    (lambda: {"m": {2**70: torch.ones(1)}}, r"state key 1180591620717411303424 under 'm' is outside"),
    (lambda: {"m": {"\ud800": torch.ones(1)}}, r"under 'm' is not valid unicode"),
    (lambda: {"c": torch.tensor([1 + 2j]).conj()}, r"key 'c' is a lazy conjugate/negative view"),
    (lambda: {"h": torch.zeros(2, dtype=torch.complex32)}, r"key 'h' has dtype torch.complex32"),
])
def test_keys_and_tensors_a_loader_would_refuse_are_refused_at_save(tmp_path, make, match):
    with pytest.raises(TypeError, match=match):
        ckpt.save(make(), str(tmp_path / "k"), step=0)
    assert ckpt.CheckpointStore(str(tmp_path / "k")).steps() == []
