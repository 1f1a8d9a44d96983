"""`loom train --model MODULE:FACTORY`: a user's own plain-PyTorch model under
loom's loop, data parallel (any model) and sequence parallel (a model that
exposes loom-style attention cores), equal to one process in float64."""
import math
import subprocess
import sys

import pytest
import torch

from loom.launch.config import ConfigError, build_config, to_toml, validate
from loom.launch.user_model import build_user_model, load_factory
from helpers import train_rows

# A tiny language model file, as a user would write it.  `PlainLM` is plain
# PyTorch (attention inline, no positions argument); `CoredLM` calls its
# attention through a swappable `core` and takes global `positions`.
USER_MODEL = '''
import torch
import torch.nn as nn
import torch.nn.functional as F

from loom.parallel import local_attention


class PlainLM(nn.Module):
    def __init__(self, vocab, dim, heads, hidden):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(256, dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens):
        b, s = tokens.shape
        x = self.embed(tokens) + self.pos(torch.arange(s, device=tokens.device))
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).transpose(1, 3).unbind(2)
        x = x + F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, s, -1)
        return self.head(x + self.mlp(x))


class CoredAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.core = local_attention  # loom swaps it for ring/Ulysses attention under --sp

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, self.heads, -1).unbind(2)   # [b, s, heads, head_dim]
        return self.out(self.core(q, k, v, causal=True).reshape(b, s, -1))


class CoredLM(nn.Module):
    def __init__(self, vocab, dim, heads, hidden, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(256, dim)
        self.attn = nn.ModuleList(CoredAttention(dim, heads) for _ in range(layers))
        self.mlp = nn.ModuleList(nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
                                 for _ in range(layers))
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, positions=None):
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for attn, mlp in zip(self.attn, self.mlp):
            x = x + attn(x)
            x = x + mlp(x)
        return self.head(x)


def make_plain(config):
    m = config.model
    return PlainLM(m.vocab, m.dim, m.heads, config.train.model_args.get("hidden", 24))


def make_cored(config):
    m, args = config.model, config.train.model_args
    return CoredLM(m.vocab, m.dim, m.heads, args.get("hidden", 24), args.get("layers", 2))


NOT_A_FACTORY = 3


def make_nothing(config):
    return "a string"


def make_wrong_vocab(config):
    m = config.model
    return PlainLM(m.vocab - 1, m.dim, m.heads, 24)


class Pooled(PlainLM):
    def forward(self, tokens):
        return super().forward(tokens).mean(1)


def make_frozen(config):
    model = make_plain(config)
    model.requires_grad_(False)
    return model


def make_pooled(config):
    m = config.model
    return Pooled(m.vocab, m.dim, m.heads, 24)
'''

COMMON = dict(data="synthetic", steps=3, batch_size=4, seq_len=8, vocab=32, dim=16, heads=2, dtype="float64", lr=1e-2,
              progress=False)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "tiny_lm.py"
    path.write_text(USER_MODEL)
    return path


def _losses(overrides):
    from loom.launch.train import train
    return train(validate(build_config(overrides=overrides)))["losses"]


@pytest.mark.timeout(300)
def test_dp2_with_a_plain_model_equals_one_process(distributed, model_file):
    common = dict(COMMON, model=f"{model_file}:make_plain", model_args=["hidden=20"])
    (one,) = distributed(_losses, 1, dict(common, dp=1), timeout=280)
    two = distributed(_losses, 2, dict(common, dp=2), timeout=280)
    # sharded (FSDP2): a model without a `blocks` list is one unit, gathered whole
    sharded = distributed(_losses, 2, dict(common, dp=2, shard_state="params"), timeout=280)
    assert len(one) == 3 and all(math.isfinite(x) for x in one)
    for losses in two + sharded:
        assert losses == pytest.approx(one, rel=0, abs=1e-10)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("attention", ["ring", "ulysses"])
def test_sp2_with_loom_style_cores_equals_one_process(distributed, model_file, attention):
    common = dict(COMMON, model=f"{model_file}:make_cored", sp_attention=attention)
    (one,) = distributed(_losses, 1, dict(common, dp=1, sp=1), timeout=280)
    two = distributed(_losses, 2, dict(common, dp=1, sp=2), timeout=280)
    for losses in two:
        assert losses == pytest.approx(one, rel=0, abs=1e-10)


def test_sp_without_cores_is_refused_at_startup(model_file):
    cfg = build_config(overrides=dict(COMMON, model=f"{model_file}:make_plain", dp=1, sp=2))
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    message = str(err.value)
    assert f"--sp=2 needs the model to expose its attention, but the model of --model={model_file}:make_plain" \
        in message
    assert "PlainLM has no swappable attention cores" in message and "--sp 1" in message
    validate(build_config(overrides=dict(COMMON, model=f"{model_file}:make_plain", dp=2)))  # dp: fine


def test_sp_needs_positions_in_forward(tmp_path):
    path = tmp_path / "nopos.py"
    path.write_text(USER_MODEL + "\n\nclass NoPositions(CoredLM):\n    def forward(self, tokens):\n"
                    "        return super().forward(tokens)\n\n\ndef make(config):\n"
                    "    return NoPositions(config.model.vocab, 16, 2, 24, 1)\n")
    with pytest.raises(ConfigError, match=r"NoPositions.forward takes no `positions` argument"):
        validate(build_config(overrides=dict(COMMON, model=f"{path}:make", dp=1, sp=2)))


@pytest.mark.parametrize("overrides,needle", [
    ({"ep": 2, "moe": "standard"}, "--ep/--moe apply only to loom's reference model"),
    ({"moe": "llep"}, "--ep/--moe apply only to loom's reference model"),
    ({"hdp": True}, "--hdp applies only to loom's reference model"),
])
def test_reference_model_options_are_refused_for_a_users_model(model_file, overrides, needle):
    with pytest.raises(ConfigError, match=needle):
        validate(build_config(overrides=dict(COMMON, model=f"{model_file}:make_plain", **overrides)))


@pytest.mark.parametrize("spec,needle", [
    ("tiny_lm", r"--model='tiny_lm' must be MODULE:FACTORY"),
    ("{file}:make_plian", r"--model=.*tiny_lm.py:make_plian: .* has no 'make_plian'; did you mean 'make_plain'\?"),
    ("{file}:NOT_A_FACTORY", r"'NOT_A_FACTORY' is a int, not a callable FACTORY"),
    ("no_such_module_xyz:make", r"--model=no_such_module_xyz:make: cannot import 'no_such_module_xyz': "
                                r"ModuleNotFoundError"),
    ("missing/lm.py:make", r"--model=missing/lm.py:make: no file 'missing/lm.py'"),
])
def test_a_bad_factory_is_named_before_workers_start(model_file, spec, needle):
    spec = spec.format(file=model_file)
    with pytest.raises(ConfigError, match=needle):
        validate(build_config(overrides=dict(COMMON, model=spec)))


def test_a_module_that_fails_to_import_says_why(tmp_path):
    (tmp_path / "broken.py").write_text("raise RuntimeError('needs a GPU driver')\n")
    with pytest.raises(ConfigError, match=r"cannot import .*broken.py.*RuntimeError: needs a GPU driver"):
        load_factory(f"{tmp_path / 'broken.py'}:make")


def test_factory_must_return_a_module(model_file):
    with pytest.raises(TypeError, match="the factory returned a str, not a torch.nn.Module"):
        build_user_model(build_config(overrides={"model": f"{model_file}:make_nothing"}))


def test_a_module_name_is_found_from_the_current_directory(model_file, monkeypatch):
    monkeypatch.chdir(model_file.parent)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(model_file.parent))])
    monkeypatch.delitem(sys.modules, "tiny_lm", raising=False)
    factory = load_factory("tiny_lm:make_cored")
    model = factory(build_config(overrides={"vocab": 32, "dim": 16, "heads": 2, "model_args": ["layers=3"]}))
    assert len(model.attn) == 3


def test_a_model_without_positions_is_called_with_tokens_only(model_file):
    model = build_user_model(build_config(overrides={"model": f"{model_file}:make_plain", "vocab": 32,
                                                     "dim": 16, "heads": 2}))
    tokens = torch.randint(0, 32, (2, 8))
    assert model(tokens, None).shape == (2, 8, 32)   # as the training loop calls it
    assert torch.equal(model(tokens, None), model(tokens))


def test_model_args_from_toml_and_flags(tmp_path):
    from loom.launch.cli import build_parser
    from loom.launch.config import config_from_args
    job = tmp_path / "job.toml"
    job.write_text('[train]\nmodel = "lm.py:make"\n[train.model_args]\nhidden = 48\nact = "gelu"\n')
    args = build_parser().parse_args(["train", "--config", str(job), "--model-args", "hidden=64", "tied=true",
                                      "--model-args", "name=small"])
    cfg = config_from_args(args)
    assert cfg.train.model == "lm.py:make"
    assert cfg.train.model_args == {"hidden": 64, "act": "gelu", "tied": True, "name": "small"}
    (tmp_path / "again.toml").write_text(to_toml(cfg))
    assert build_config(__import__("tomllib").loads(to_toml(cfg))) == cfg
    with pytest.raises(ConfigError, match=r"\[train\] model_args: 'hidden' must be KEY=VALUE"):
        build_config(overrides={"model_args": ["hidden"]})


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_loom_train_with_a_module_from_the_current_directory(model_file, tmp_path):
    """Through Ray: the workers import MODULE from the driver's directory.
    ``python -P`` keeps the directory off the driver's sys.path, as for the
    ``loom`` console script."""
    proc = subprocess.run(
        [sys.executable, *(["-P"] if sys.version_info >= (3, 11) else []), "-m", "loom", "train",
         "--model", "tiny_lm:make_plain", "--model-args",
         "hidden=20", "--steps", "3", "--batch-size", "4", "--seq-len", "8",
         "--data", "synthetic", "--vocab", "32", "--dim", "16",
         "--heads", "2", "--dtype", "float64", "--lr", "0.01", "--name", "own", "--runs-dir", str(tmp_path),
         "--no-progress"],
        cwd=model_file.parent, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    metrics = train_rows(tmp_path / "own" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [0, 1, 2]
    assert 'model = "tiny_lm:make_plain"' in (tmp_path / "own" / "config.toml").read_text()


@pytest.mark.parametrize("factory,got", [("make_wrong_vocab", r"torch.float32 tensor of shape \[2, 8, 31\]"),
                                         ("make_pooled", r"torch.float32 tensor of shape \[2, 32\]")])
def test_wrong_logits_are_named_not_a_loss_error(model_file, factory, got):
    model = build_user_model(build_config(overrides={"model": f"{model_file}:{factory}", "vocab": 32,
                                                     "dim": 16, "heads": 2}))
    with pytest.raises(TypeError, match=rf"--model=.*:{factory}: the model returned a {got} for token ids "
                                        rf"of shape \[2, 8\]; it must return floating-point logits "
                                        rf"\[batch, seq, vocab\] = \[2, 8, 32\]"):
        model(torch.randint(0, 31, (2, 8)), None)


def test_a_module_that_exits_on_import_is_named(tmp_path):
    (tmp_path / "exits.py").write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(ConfigError, match=r"cannot import .*exits.py.*SystemExit: 3"):
        load_factory(f"{tmp_path / 'exits.py'}:make")


def test_activation_checkpointing_needs_blocks_before_workers_start(model_file):
    with pytest.raises(ConfigError, match=r"--activation-checkpointing .* \(PlainLM\) has no 'blocks'"):
        validate(build_config(overrides=dict(COMMON, model=f"{model_file}:make_plain",
                                             activation_checkpointing=True)))


def test_a_model_with_nothing_to_train_is_named(model_file):
    with pytest.raises(TypeError, match="the factory's PlainLM has no trainable parameters"):
        build_user_model(build_config(overrides={"model": f"{model_file}:make_frozen"}))
