"""The typed manifest: the dataclasses of `loom.checkpoint.manifest` read
and write exactly the JSON loom writes.

``data/manifest_v1.json`` and ``data/manifest_v1_world2.json`` are manifests
saved by loom before the manifest was typed (one process: every placement, a
0-d, an empty and a bfloat16 tensor, list and tuple containers, escaped keys
and every kind of value; two processes: shards, replicas split over ranks,
flat ranges, per-rank tensors and values, a multi-chunk grid whose checksums
are in write order, not sorted).
"""
from __future__ import annotations

import json
import math
import pathlib
from dataclasses import FrozenInstanceError

import pytest
import torch

from loom import checkpoint as ckpt
from loom.checkpoint.manifest import (MANIFEST, Fragment, InvalidCheckpointError, Manifest, TensorEntry,
                                      ValueEntry, check_manifest)
from loom.checkpoint.store import CheckpointStore, step_name

DATA = pathlib.Path(__file__).parent / "data"
FIXTURES = ["manifest_v1.json", "manifest_v1_world2.json"]


@pytest.mark.parametrize("name", FIXTURES)
def test_a_manifest_saved_before_typing_round_trips_byte_for_byte(name):
    raw = (DATA / name).read_bytes()
    m = Manifest.from_json(raw, name)
    assert m.to_json() == raw
    assert Manifest.from_json(m.to_json(), name) == m
    # the document is what the dataclasses say, field by field and in order
    doc = json.loads(raw)
    assert list(doc) == [f for f in Manifest.__dataclass_fields__]
    for key, entry in doc["tensors"].items():
        assert list(entry) == list(TensorEntry.__dataclass_fields__), key


def test_the_fixtures_hold_every_placement_and_value_kind():
    ms = [Manifest.from_json((DATA / n).read_bytes(), n) for n in FIXTURES]
    placements = {e.placement for m in ms for e in m.tensors.values()}
    assert placements == {"replicated", "shard", "flat", "per_rank"}
    values = [v for m in ms for v in m.values.values()]
    assert any(v.is_per_rank for v in values) and any(not v.is_per_rank for v in values)
    assert any(len(e.fragments) > 1 for m in ms for e in m.tensors.values())
    sums = ms[1].tensors["rep"].checksums
    assert list(sums) != sorted(sums)  # write order survives the round trip


def test_typed_fields_and_decoded_values():
    m = Manifest.from_json((DATA / "manifest_v1.json").read_bytes(), "m")
    assert (m.step, m.world_size, m.mesh) == (12, 1, {"dp": 1, "sp": 1})
    w = m.tensors["model/w"]
    assert (w.path, w.containers, w.dtype, w.storage_dtype) == (("model", "w"), "dd", "bfloat16", "uint16")
    assert w.shape == w.storage_shape == (3, 5) and w.tensor_dtype == torch.bfloat16
    assert w.fragments == (Fragment(0, (0, 0), (3, 5)),) and w.fragments[0].box == ((0, 0), (3, 5))
    assert m.tensors["model/layers/0"].path == ("model", "layers", 0)
    flat = m.tensors["flat"]
    assert flat.shape == (2, 3) and flat.storage_shape == (6,)
    assert m.tensors["rank_t"].storage_shape == (1, 2)
    opt = m.values["opt"].decoded()
    assert math.isnan(opt["nan"]) and opt["inf"] == -math.inf and opt["t"] == (1, "x", [2.5])
    assert opt["ints"] == {1: "one", (2, 3): "tuple"} and opt["none"] is None
    assert m.values["rng"].decoded(0) == {"seed": 3, "pos": (1, 2)}
    with pytest.raises(ValueError, match="needs the rank"):
        m.values["rng"].decoded()
    with pytest.raises(FrozenInstanceError):
        m.step = 3


def test_a_null_value_is_a_value_not_a_per_rank_list():
    e = ValueEntry(path=("n",), containers="d", value=None)
    assert not e.is_per_rank and e.jsonable() == {"path": ["n"], "containers": "d", "value": None}
    e = ValueEntry(path=("n",), containers="d", per_rank=(None, 1))
    assert e.jsonable() == {"path": ["n"], "containers": "d", "per_rank": [None, 1]}


def test_a_save_writes_what_its_manifest_parses_back_to(tmp_path):
    state = {"w": torch.arange(6.0).reshape(2, 3), "s": ckpt.Shard(torch.ones(2, 2), (2, 2), (0, 0)),
             "f": ckpt.Flat(torch.zeros(4), (2, 2), 0), "r": ckpt.PerRank(torch.ones(1)),
             "v": {"a": (1, 2.5, None)}, "p": ckpt.PerRank("x")}
    ckpt.save(state, tmp_path, step=3, mesh={"dp": 1})
    raw = (tmp_path / step_name(3) / MANIFEST).read_bytes()
    m = CheckpointStore(str(tmp_path)).read_manifest(3)
    assert m.to_json() == raw and m.mesh == {"dp": 1}
    assert {k: e.placement for k, e in m.tensors.items()} == {"w": "replicated", "s": "shard", "f": "flat",
                                                               "r": "per_rank"}


def test_check_manifest_is_the_parsing_of_a_document():
    doc = json.loads((DATA / "manifest_v1.json").read_bytes())
    assert check_manifest(doc, "m", 12) == Manifest.from_json((DATA / "manifest_v1.json").read_bytes(), "m")
    with pytest.raises(InvalidCheckpointError) as err:
        check_manifest(doc, "m", 13)
    assert (err.value.file, err.value.field) == ("m", "step")
    doc["tensors"]["model/w"]["fragments"][0][0] = 1
    with pytest.raises(InvalidCheckpointError) as err:
        check_manifest(doc, "m")
    assert err.value.field == "tensors['model/w'].fragments[0][0]"
