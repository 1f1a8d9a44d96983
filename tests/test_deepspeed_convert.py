"""`loom ckpt from-deepspeed` against DeepSpeed's own `ds_to_universal`, for a
tiny model trained 2 steps with ZeRO stage 1 and 2 on 2 gloo (CPU) ranks."""
import os

import pytest
import torch

from loom import checkpoint as ckpt
from loom.comms.testing import run_distributed

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
    return "ok"


def _universal(tag_dir, out):
    """DeepSpeed's own converter (as its command line runs it, one worker)."""
    import argparse
    from deepspeed.checkpoint.ds_to_universal import main
    main(argparse.Namespace(input_folder=tag_dir, output_folder=out, num_extract_workers=1,
                            num_merge_workers=1, keep_temp_folder=False, strict=True,
                            inject_missing_state=True))


def _pt(path):
    return torch.load(path, weights_only=False)


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


def test_from_deepspeed_rejects_what_it_cannot_read(tmp_path):
    from loom.checkpoint.deepspeed_convert import from_deepspeed
    with pytest.raises(FileNotFoundError, match="no DeepSpeed checkpoint"):
        from_deepspeed(str(tmp_path), str(tmp_path / "out"))
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="bf16 optimizer layout is not supported"):
        from_deepspeed(str(tmp_path), str(tmp_path / "out"), tag="t")
