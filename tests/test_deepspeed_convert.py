"""`loom ckpt from-deepspeed` against DeepSpeed's own `ds_to_universal` and its
own full-parameter accessors, for a tiny model trained 2 steps with ZeRO
stage 1 and 2 (AdamW) and ZeRO-1 (SGD with momentum) on 2 gloo (CPU) ranks;
directories saved through loom's DeepSpeed engine convert to the same state;
hostile files are refused without running them."""
import json
import os
import shutil

import pytest
import torch

from loom import checkpoint as ckpt
from loom.comms.testing import run_distributed

from helpers import assert_same

ENV = {"DS_ACCELERATOR": "cpu"}


def _model():
    torch.manual_seed(0)
    # 66 parameters: ZeRO's 2 partitions split '0.weight' inside, and pad the last one
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def _train_deepspeed(root):
    import deepspeed
    import torch.distributed as dist
    for stage in (1, 2):
        model = _model()
        config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                  "zero_optimization": {"stage": stage},
                  "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.01,
                                                            "torch_adam": True}}}
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                               config=config)
        g = torch.Generator().manual_seed(dist.get_rank())
        for _ in range(2):
            loss = engine(torch.randn(2, 5, generator=g)).pow(2).sum()
            engine.backward(loss)
            engine.step()
        engine.save_checkpoint(os.path.join(root, f"stage{stage}"))
        ckpt.install_deepspeed_engine(engine)      # the same state through loom's engine
        engine.save_checkpoint(os.path.join(root, f"stage{stage}_loom"))
        engine.checkpoint_engine.wait()
        engine.destroy()
    return "ok"


def _universal(tag_dir, out):
    """DeepSpeed's own converter (as its command line runs it, one worker)."""
    import argparse
    from deepspeed.checkpoint.ds_to_universal import main
    main(argparse.Namespace(input_folder=tag_dir, output_folder=out, num_extract_workers=1,
                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                            inject_missing_state=True))


def _pt(path):
    return torch.load(path, weights_only=False)  # files this test wrote itself


def _assert_same_state(url_a, url_b):
    """Two converted checkpoints hold the same tensors and values (but the source)."""
    a, b = ({"model": None, "optim": None, "deepspeed": None} for _ in range(2))
    ckpt.load(a, url_a, strict=False)
    ckpt.load(b, url_b, strict=False)
    a["deepspeed"].pop("source"), b["deepspeed"].pop("source")

    assert_same(a, b, "state", exact_types=True)
    assert len(a["optim"]["state"]) == 4


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_from_deepspeed_matches_ds_to_universal(tmp_path):
    from loom.launch.cli import main
    run_distributed(_train_deepspeed, 2, str(tmp_path), timeout=400, env=ENV)
    for stage in (1, 2):
        ds_dir = tmp_path / f"stage{stage}"
        universal = tmp_path / f"universal{stage}"
        _universal(str(ds_dir / "global_step2"), str(universal))
        url = f"file://{tmp_path}/loom{stage}"
        assert main(["ckpt", "from-deepspeed", str(ds_dir), url]) == 0

        # into a plain PyTorch model + AdamW, at world size 1
        model = _model()
        opt = torch.optim.AdamW(model.parameters(), lr=1.0)
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        info = ckpt.load(state, url)
        assert info.step == 2 and info.unexpected == ["deepspeed"]
        opt.load_state_dict(state["optim"])
        assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["weight_decay"] == 0.01
        for name, p in model.named_parameters():
            zero = universal / "zero" / name
            assert torch.equal(p.detach(), _pt(zero / "fp32.pt")["param"]), (stage, name)
            assert torch.equal(opt.state[p]["exp_avg"], _pt(zero / "exp_avg.pt")["param"]), (stage, name)
            assert torch.equal(opt.state[p]["exp_avg_sq"], _pt(zero / "exp_avg_sq.pt")["param"]), (stage, name)
            assert float(opt.state[p]["step"]) == float(_pt(zero / "step.pt")) == 2.0
        meta = {"deepspeed": None}
        ckpt.load(meta, url, strict=False)
        assert meta["deepspeed"]["zero_stage"] == stage and meta["deepspeed"]["dp_world_size"] == 2
        assert meta["deepspeed"]["param_names"] == ["0.weight", "0.bias", "2.weight", "2.bias"]

        # the same state saved through install_deepspeed_engine (JSON pointers into a loom store)
        assert (ds_dir.parent / f"stage{stage}_loom" / "global_step2" / "mp_rank_00_model_states.pt") \
            .read_bytes().startswith(b'{"format": "loom.deepspeed-pointer"')
        through = f"file://{tmp_path}/through_loom{stage}"
        assert main(["ckpt", "from-deepspeed", str(tmp_path / f"stage{stage}_loom"), through]) == 0
        _assert_same_state(url, through)


def test_from_deepspeed_rejects_what_it_cannot_read(tmp_path):
    from loom.checkpoint.deepspeed_convert import from_deepspeed
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        from_deepspeed(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="bf16 optimizer layout is not supported"):
        from_deepspeed(str(tmp_path), str(tmp_path / "out"), tag="t")


# ------------------------------------------------------ SGD with momentum

def _train_sgd(root):
    """ZeRO-1 with SGD + momentum, 2 steps; saved by DeepSpeed and through
    loom's engine.  Returns DeepSpeed's own full fp32 weights and momentum."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    model = _model()
    config = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1},
              "zero_allow_untested_optimizer": True, "steps_per_print": 10**6,
              "optimizer": {"type": "SGD", "params": {"lr": 1e-2, "momentum": 0.9}}}
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    g = torch.Generator().manual_seed(dist.get_rank())
    for _ in range(2):
        loss = engine(torch.randn(2, 5, generator=g)).pow(2).sum()
        engine.backward(loss)
        engine.step()
    engine.save_checkpoint(os.path.join(root, "sgd"))
    full = {name: (safe_get_full_fp32_param(p).clone(), safe_get_full_optimizer_state(p, "momentum_buffer").clone())
            for name, p in engine.module.named_parameters()}
    ckpt.install_deepspeed_engine(engine)
    engine.save_checkpoint(os.path.join(root, "sgd_loom"))
    engine.checkpoint_engine.wait()
    engine.destroy()
    return full


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_from_deepspeed_converts_sgd_momentum(tmp_path):
    from loom.checkpoint.deepspeed_convert import from_deepspeed
    full = run_distributed(_train_sgd, 2, str(tmp_path), timeout=400, env=ENV)[0]
    url = f"file://{tmp_path}/loom_sgd"
    assert from_deepspeed(str(tmp_path / "sgd"), url).endswith("step-00000002")
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.5)
    state = {"model": model.state_dict(), "optim": opt.state_dict()}
    ckpt.load(state, url, strict=False)
    opt.load_state_dict(state["optim"])
    assert opt.param_groups[0]["lr"] == 1e-2 and opt.param_groups[0]["momentum"] == 0.9
    for name, p in model.named_parameters():
        weight, momentum = full[name]
        assert torch.equal(p.detach(), weight), name
        assert list(opt.state[p]) == ["momentum_buffer"]
        assert torch.equal(opt.state[p]["momentum_buffer"], momentum), name
    # the same state saved through loom's DeepSpeed engine
    through = f"file://{tmp_path}/loom_sgd_through"
    from_deepspeed(str(tmp_path / "sgd_loom"), through)
    _assert_same_state(url, through)

    # an optimizer state of a shape loom cannot place is refused by name
    odd = tmp_path / "odd"
    shutil.copytree(tmp_path / "sgd", odd)
    f = odd / "global_step2" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    sd = _pt(f)
    sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["trace"] = torch.zeros(3)
    torch.save(sd, f)
    sd = _pt(odd / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match="rank 0 holds optimizer states .'momentum_buffer'. but rank 1 holds"):
        from_deepspeed(str(odd), str(tmp_path / "out"))
    sd["optimizer_state_dict"]["base_optimizer_state"]["state"][0]["trace"] = torch.zeros(3)
    torch.save(sd, odd / "global_step2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ValueError, match=r"optimizer state 'trace' on rank 0 is a tensor of shape \(3,\), "
                                         r"neither a flat tensor of the partition's size"):
        from_deepspeed(str(odd), str(tmp_path / "out"))

    # a loom-engine directory whose pointers name another store is refused
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "sgd_loom", moved)
    pointer = moved / "global_step2" / "mp_rank_00_model_states.pt"
    assert json.loads(pointer.read_text())["url"] == str(tmp_path / "sgd_loom" / "loom")
    with pytest.raises(ckpt.InvalidCheckpointError, match="names the store"):
        from_deepspeed(str(moved), str(tmp_path / "out"))
    from_deepspeed(str(moved), f"file://{tmp_path}/loom_moved", loom_url=str(tmp_path / "sgd_loom" / "loom"))
    _assert_same_state(url, f"file://{tmp_path}/loom_moved")


# --------------------------------------------------------- hostile files

class _Opens:
    """Unpickling this opens (creates) ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


class _DeepSpeedWriter(_Opens):
    """Unpickling this calls DeepSpeed's PyFileWriter(path), which creates ``path``."""

    def __reduce__(self):
        from deepspeed.io.py_file_writer import PyFileWriter
        return (PyFileWriter, (self.path,))


@pytest.mark.parametrize("evil, named", [(_Opens, "io.open"),
                                         (_DeepSpeedWriter, "deepspeed.io.py_file_writer.PyFileWriter")])
def test_from_deepspeed_never_runs_a_hostile_pickle(tmp_path, capsys, evil, named):
    from loom.launch.cli import main
    victim = tmp_path / "created.txt"
    tag = tmp_path / "ds" / "global_step1"
    tag.mkdir(parents=True)
    torch.save({"module": {}, "param_shapes": [], "x": evil(str(victim))}, tag / "mp_rank_00_model_states.pt")
    torch.save({"optimizer_state_dict": {}}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (tmp_path / "ds" / "latest").write_text("global_step1")
    assert main(["ckpt", "from-deepspeed", str(tmp_path / "ds"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"refers to {named}, which loom does not load" in err
    assert not victim.exists()


def test_from_deepspeed_errors_are_one_line_value_errors(tmp_path, capsys):
    from loom.checkpoint.deepspeed_convert import from_deepspeed
    from loom.launch.cli import main
    tag = tmp_path / "ds" / "global_step1"
    tag.mkdir(parents=True)
    torch.save({"module": {}, "param_shapes": []}, tag / "mp_rank_00_model_states.pt")
    torch.save({"no": "optimizer"}, tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    with pytest.raises(ckpt.InvalidCheckpointError, match="no 'optimizer_state_dict'") as err:
        from_deepspeed(str(tag), str(tmp_path / "out"))
    assert err.value.field == "optimizer_state_dict"
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"\x80\x04 not a torch file")
    assert main(["ckpt", "from-deepspeed", str(tag), str(tmp_path / "out")]) == 1
    assert "is not a torch checkpoint file" in capsys.readouterr().err
    (tmp_path / "ds" / "latest").write_text("../../elsewhere")
    with pytest.raises(ckpt.InvalidCheckpointError, match="is not a directory name inside"):
        from_deepspeed(str(tmp_path / "ds"), str(tmp_path / "out"))
    (tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_text('{"format": "loom.deepspeed-pointer"}')
    assert main(["ckpt", "from-deepspeed", str(tag), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "a loom pointer has the fields format, url, step, file" in err
