"""The checkpoint-levels benchmark (benchmarks/checkpoint_levels.py): its
--quick run against its own moto server measures every level and method,
finds the chunks it made larger than the block size stored as multipart
uploads, counts the requests moto served, and leaves the repository and
this process's environment as they were.  Structure only: no timing
targets."""
import os
import sys

import pytest

pytest.importorskip("moto.server", reason="moto[server] is in the test extra: pip install -e '.[test]'")
pytest.importorskip("s3fs", reason="s3fs is in the test extra: pip install -e '.[test]'")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import checkpoint_levels as bench  # noqa: E402

MIB = 1 << 20


@pytest.mark.timeout(240)
def test_quick_run_measures_every_level_and_method_and_writes_nothing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a --quick run wrote results")
    monkeypatch.setattr(bench, "write_json", refuse)
    monkeypatch.setattr(bench, "update_results", refuse)
    environ = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    out = bench.main(["--quick"])
    assert {k: v for k, v in os.environ.items() if k.startswith("AWS_")} == environ  # restored

    # 16 MiB: one tensor, each rank's half (8 MiB) one chunk object
    assert (out["tensors"], out["bytes"]) == (1, 16 * MIB)
    assert out["chunk_objects"] == {0: [8 * MIB], 1: [8 * MIB]}
    assert list(out["levels"]) == list(bench.LEVELS) == ["local", "s3"]
    for level in out["levels"].values():
        assert level["load_s"] > 0
        assert set(level["stall"]) == set(bench.MODES)
        for mode, r in level["stall"].items():
            assert len(r["stalls_s"]) == len(r["durables_s"]) == 1 and r["step_s"] > 0
            assert 0 < r["stall_s"] <= r["durable_s"]
            if mode == "sync":
                assert r["stall_s"] == r["durable_s"] and r["steps_during"] == [0]
    ml = out["multilevel"]  # multi-level: local commit, then S3 in the background; loads from either level
    assert 0 < ml["local_durable_s"] < ml["remote_durable_s"] and ml["stall_s"] > 0
    assert ml["tiers"]["local"] == {"local": 8 * MIB} and ml["tiers"]["remote"] == {"storage": 8 * MIB}
    bg = out["multilevel_background"]  # the local commit in the background: the loop waits for the snapshot
    assert 0 < bg["stall_s"] < bg["local_durable_s"] < bg["remote_durable_s"]
    assert bg["tiers"] == ml["tiers"]
    throughput = out["levels"]["s3"]["throughput"]
    assert set(throughput) == {"loom", "loom_fixed", "raw", "raw_batch", "dcp"}
    assert all(t["save"] > 0 and t["load"] > 0 for t in throughput.values())
    assert all(v > 0 for v in out["ratios"].values())

    # the raw baseline moved the same objects as loom's chunks: one PUT and one GET each
    requests = out["requests"]
    assert requests["raw"]["PutObject"] == requests["raw"]["GetObject"] == 2
    assert requests["raw_batch"]["PutObject"] == requests["raw_batch"]["GetObject"] == 2
    assert requests["loom"]["PutObject"] >= 2 and requests["loom"]["GetObject"] >= 2
    assert "UploadPart" not in requests["loom"]  # 8 MiB chunks, 50 MiB blocks: single PUTs
    # with 5 MiB blocks each 8 MiB chunk is one multipart upload
    mp = out["multipart"]
    assert (mp["chunk_objects"], mp["larger_than_block"], mp["multipart_etags"]) == (2, 2, 2)
    assert mp["large_are_multipart"]
    assert mp["requests"]["CreateMultipartUpload"] == mp["requests"]["CompleteMultipartUpload"] == 2
    assert mp["requests"]["UploadPart"] >= 2
