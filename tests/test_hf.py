"""transformers causal LMs under loom's sequence parallelism
(`loom.parallel.hf.parallelize`): tiny random configs written here (no
downloads), float64, sp = 2 (ring, Ulysses) and dp × sp = 2 × 2, against the
single-process transformers model: loss and every gradient equal to 1e-10."""
import pytest
import torch
import transformers  # the test extra holds the hf extra's transformers

from loom import comms

SEQ, BATCH, VOCAB = 16, 2, 64


def _config(kind: str):
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=64, attention_dropout=0.0)
    if kind == "llama":  # GQA and tied embeddings
        return transformers.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **common)
    if kind == "qwen2":  # q/k/v biases
        return transformers.Qwen2Config(num_key_value_heads=2, use_sliding_window=False, **common)
    if kind == "mixtral":  # 4 experts, top-2, renormalised gates
        return transformers.MixtralConfig(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                                          **{**common, "intermediate_size": 24})
    if kind == "qwen2_moe":  # a shared expert and its gate, gates not renormalised, one dense layer
        return transformers.Qwen2MoeConfig(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                                           moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                           norm_topk_prob=False, mlp_only_layers=[1], use_sliding_window=False,
                                           **common)
    raise ValueError(kind)


def _rms_norm_in_float64(self, hidden_states):
    variance = hidden_states.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden_states * torch.rsqrt(variance + self.variance_epsilon))


def _model(kind: str):
    """The model in float64.  Its RMSNorms compute in float32 whatever the
    input (transformers' choice), which turns the last-bit differences of
    any two attention implementations into float32 roundings (1e-8): here
    they keep float64, in the reference and the parallel model alike.  The
    reference attends by SDPA (float64 throughout; "eager" takes its softmax
    in float32); MoE experts run transformers' "eager" loop (its grouped
    matmul has no float64)."""
    import types

    torch.manual_seed(0)
    extra = {"experts_implementation": "eager"} if "moe" in kind or kind == "mixtral" else {}
    model = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa", **extra).double()
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm"):
            module.forward = types.MethodType(_rms_norm_in_float64, module)
    return model


def _batch():
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH * 2, SEQ), generator=gen)
    labels = ids.clone()
    labels[0, 3:6] = -100  # unlabelled tokens count nowhere
    return ids, labels


def _reference(kind: str):
    """One process: the next-token loss over the whole sequence and its
    gradients, in float64 (transformers' own ``labels=`` loss upcasts logits
    to float32 only: it agrees to 1e-7)."""
    import torch.nn.functional as F
    model = _model(kind)
    ids, labels = _batch()
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    assert abs(loss.item() - model(input_ids=ids, labels=labels).loss.item()) < 1e-6
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _parallel(kind: str, dp: int, sp: int, attention: str):
    from loom.parallel.hf import parallelize
    mesh = comms.init_mesh(dp=dp, sp=sp, sp_inner=2 if attention == "ulysses-ring" else 1)
    model = _model(kind)
    return _step(parallelize(model, mesh, sp_attention=attention), dp)


def _step(lm, dp: int):
    """One forward/backward/sync of ``lm`` (a `ParallelCausalLM`) on this
    rank's rows and shard of `_batch`: (the mean loss over the world, the
    gradients by parameter name)."""
    mesh, model = lm.mesh, lm.model
    ids, labels = _batch()
    rows = slice(mesh.dp_rank * (len(ids) // dp), (mesh.dp_rank + 1) * (len(ids) // dp))
    batch = lm.shard(ids[rows], labels[rows])
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    loss = lm.loss(logits, batch["labels"])
    loss.backward()
    lm.sync()
    value = loss.detach().reshape(1).clone()
    comms.all_reduce(value)
    return value.item() / mesh.world_size, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,dp,sp,attention", [("llama", 1, 2, "ring"), ("llama", 1, 2, "ulysses"),
                                                  ("qwen2", 2, 2, "ring"), ("llama", 1, 4, "ulysses-ring")])
def test_parallel_equals_one_process(distributed, kind, dp, sp, attention):
    want_loss, want_grads = _reference(kind)
    per_rank = distributed(_parallel, dp * sp, kind, dp, sp, attention, timeout=200)
    for loss, grads in per_rank:
        assert abs(loss - want_loss) <= 1e-10, (loss, want_loss)
        assert grads.keys() == want_grads.keys()
        for name, g in grads.items():
            error = (g - want_grads[name]).abs().max().item()
            assert error <= 1e-10, f"{name}: {error:.2e} from the one-process gradient"


def _refusals():

    from loom.parallel.hf import parallelize
    mesh = comms.init_mesh(dp=1, sp=2)
    found = []
    lm = parallelize(_model("llama"), mesh)
    ids, _ = _batch()
    batch = lm.shard(ids)
    try:
        lm.model(input_ids=batch["input_ids"], attention_mask=torch.zeros_like(batch["input_ids"]))
    except ValueError as exc:
        found.append(str(exc))
    for bad in (dict(attention_dropout=0.1), ):
        config = _config("llama")
        for key, value in bad.items():
            setattr(config, key, value)
        try:
            parallelize(transformers.AutoModelForCausalLM.from_config(config), mesh)
        except ValueError as exc:
            found.append(str(exc))
    try:
        lm.shard(ids, ids[:, :-1])
    except ValueError as exc:
        found.append(str(exc))
    return found


@pytest.mark.timeout(120)
def test_what_cannot_be_honoured_is_refused(distributed):
    found = distributed(_refusals, 2, timeout=100)[0]
    assert len(found) == 3, found
    assert "padding attention_mask" in found[0]
    assert "attention_dropout=0.1" in found[1]
    assert "labels" in found[2]


# ------------------------------------------------------------------ loom train --hf-config

def _save(tmp_path, kind="llama", weights=False):
    """A config.json (and, with ``weights``, model.safetensors) in a directory."""
    path = tmp_path / f"{kind}-hf"
    if weights:
        _model(kind).float().save_pretrained(path, safe_serialization=True)
    else:
        _config(kind).save_pretrained(path)
    return path


def test_hf_config_shapes_the_job_and_bad_files_are_refused(tmp_path):
    import json

    from loom.launch.config import ConfigError, build_config
    from loom.launch.hf_model import HF_FACTORY
    path = _save(tmp_path)
    cfg = build_config(overrides=dict(hf_config=str(path)))
    assert cfg.train.model == HF_FACTORY
    m = cfg.model
    assert (m.vocab, m.dim, m.heads, m.kv_heads, m.layers) == (VOCAB, 32, 4, 2, 2)
    assert build_config(overrides=dict(init_from_hf=str(path))).train.hf_config == str(path)  # implies --hf-config
    cases = {"no file": (dict(hf_config=str(tmp_path / "missing")), "no file"),
             "hub": (dict(hf_config="hf://meta-llama/Llama-3"), "local config.json"),
             "both": (dict(hf_config=str(path), model="my.lm:make"), "both name the model")}
    for what, (overrides, message) in cases.items():
        with pytest.raises(ConfigError, match=message):
            build_config(overrides=overrides)
    data = json.loads((path / "config.json").read_text())
    for what, change, message in (("custom code", {"auto_map": {"AutoModel": "x.Y"}}, "runs no code"),
                                  ("vocab", {"vocab_size": 0}, "vocab_size=0"),
                                  ("not a config", {"model_type": None}, "no \"model_type\"")):
        bad = tmp_path / what.replace(" ", "-")
        bad.mkdir()
        (bad / "config.json").write_text(json.dumps({**data, **change}))
        with pytest.raises(ConfigError, match=message):
            build_config(overrides=dict(hf_config=str(bad)))
    for flag, value in (("dim", 48), ("heads", 8), ("vocab", VOCAB + 1), ("layers", 5), ("kv_heads", 4)):
        with pytest.raises(ConfigError, match=f"--{flag.replace('_', '-')}={value} conflicts with --hf-config"):
            build_config(overrides={"hf_config": str(path), flag: value})   # not overridden silently
    assert build_config(overrides=dict(hf_config=str(path), dim=32)).model.dim == 32   # the same value is fine
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a JSON model config"):
        build_config(overrides=dict(hf_config=str(tmp_path / "junk.json")))


def test_init_from_hf_starts_from_the_checkpoint_s_weights(tmp_path):
    from loom.launch.config import build_config
    from loom.launch.hf_model import build_hf_model
    path = _save(tmp_path, weights=True)
    original = transformers.AutoModelForCausalLM.from_pretrained(path).double()
    cfg = build_config(overrides=dict(init_from_hf=str(path), seed=123))
    torch.manual_seed(123)
    model = build_hf_model(cfg).double()
    mine = dict(model.lm.named_parameters())
    for name, p in original.named_parameters():
        assert torch.equal(mine[name], p), name
    ids, _ = _batch()
    torch.testing.assert_close(model(ids), original(input_ids=ids).logits, atol=1e-12, rtol=0)
    # the same weights saved in shards (model.safetensors.index.json + several files)
    sharded = tmp_path / "sharded"
    original.float().save_pretrained(sharded, safe_serialization=True, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 1
    again = build_hf_model(build_config(overrides=dict(init_from_hf=str(sharded)))).double()
    for name, p in again.lm.named_parameters():
        assert torch.equal(p, mine[name]), name
    # the weights directory lacks safetensors: a clear error, no pickle read
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text((path / "config.json").read_text())
    from loom.launch.config import ConfigError
    with pytest.raises(ConfigError, match="--init-from-hf"):
        build_hf_model(build_config(overrides=dict(init_from_hf=str(tmp_path / "empty"))))


@pytest.mark.e2e
@pytest.mark.timeout(400)
def test_loom_train_hf_config_sp2_resumes_at_dp2(tmp_path):
    """``loom train --hf-config`` (Llama, GQA, tied embeddings, float64) at
    sp=2 ring with a checkpoint at step 3, then resumed at dp=2: the resumed
    steps' losses equal those of an uninterrupted sp=1 run (to 1e-9: the
    model's RMSNorms round to float32, so two attention implementations
    agree to float32's last bits there, not float64's)."""
    import subprocess
    import sys

    from helpers import train_rows
    path = _save(tmp_path)
    base = [sys.executable, "-m", "loom", "train", "--hf-config", str(path), "--data", "synthetic", "--seq-len", "16",
            "--batch-size", "4", "--dtype", "float64", "--steps", "6", "--eval-every", "0", "--no-progress",
            "--runs-dir", str(tmp_path)]
    runs = {"one": ["--dp", "1"],
            "sp2": ["--dp", "1", "--sp", "2", "--ckpt-every", "3", "--ckpt-url", str(tmp_path / "ck"),
                    "--steps", "3"],
            "dp2": ["--dp", "2", "--resume", "--ckpt-url", str(tmp_path / "ck")]}
    losses = {}
    for name, args in runs.items():
        proc = subprocess.run(base + ["--name", name, *args], capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        losses[name] = {r["step"]: r["loss"] for r in train_rows(tmp_path / name / "metrics.jsonl")}
    assert sorted(losses["sp2"]) == [0, 1, 2] and sorted(losses["dp2"]) == [3, 4, 5]
    for step, loss in {**losses["sp2"], **losses["dp2"]}.items():
        assert abs(loss - losses["one"][step]) < 1e-9, (step, loss, losses["one"][step])
    # export the sp=2 checkpoint (step 3) and load it with transformers alone
    out = tmp_path / "exported"
    proc = subprocess.run([sys.executable, "-m", "loom", "ckpt", "export-hf", str(tmp_path / "ck"), str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 3" in proc.stdout and "LlamaForCausalLM" in proc.stdout
    exported = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert exported.dtype == torch.float64 and exported.config.tie_word_embeddings
    from loom import checkpoint
    from loom.launch.config import build_config
    from loom.launch.hf_model import build_hf_model
    mine = build_hf_model(build_config(overrides=dict(hf_config=str(path)))).double()
    checkpoint.load({"model": mine.state_dict()}, str(tmp_path / "ck"), step=3)
    ids, _ = _batch()
    torch.testing.assert_close(exported(input_ids=ids).logits, mine(ids), atol=0, rtol=0)
    again = subprocess.run([sys.executable, "-m", "loom", "ckpt", "export-hf", str(tmp_path / "ck"), str(out)],
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 1 and "not an empty directory" in again.stderr


# ------------------------------------------------------------------ sharded state, activation checkpointing

def _train_adapter(kind: str, shard: str, checkpointed: bool, steps: int = 3):
    """Three AdamW steps of the `CausalLMAdapter` of ``kind`` at dp = 2
    (float64), its state replicated (``shard="none"``: gradients averaged by
    `GradientSync`) or sharded by `shard_data_parallel` with the adapter's
    own ``blocks``/``embed``/``head``: (losses averaged over the ranks, the
    whole parameters at the end, the FSDP units' class names, whether the
    head's weight is still the embedding's after the steps)."""
    import torch.nn.functional as F
    from torch.distributed.tensor import DTensor

    from loom.launch.hf_model import CausalLMAdapter
    from loom.parallel import GradientSync, apply_activation_checkpointing, shard_data_parallel
    mesh = comms.init_mesh(dp=2, sp=1)
    model = CausalLMAdapter(_model(kind))
    if checkpointed:
        apply_activation_checkpointing(model)
    units = []
    if shard == "none":
        sync = GradientSync(model.parameters(), group=None)
    else:
        sync = shard_data_parallel(model, shard)
        units = [type(u).__name__ for u in sync.units]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, labels = _batch()
    rows = slice(mesh.dp_rank * 2, mesh.dp_rank * 2 + 2)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        logits = model(ids[rows])
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[rows, 1:].reshape(-1), ignore_index=-100)
        loss.backward()
        sync.sync()
        opt.step()
        value = loss.detach().reshape(1).clone()
        comms.all_reduce(value)
        losses.append(value.item() / 2)
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in model.named_parameters()}
    return losses, params, units, model.head.weight is model.embed.weight


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,shard", [("llama", "params"), ("qwen2", "grads")])
def test_hf_model_sharded_and_checkpointed_equals_replicated(distributed, kind, shard):
    """dp = 2, float64: sharding the state (each decoder layer its own FSDP
    unit; Qwen2's untied embedding and head units of their own, Llama's tied
    pair one tensor in the root unit) and recomputing each decoder layer's
    activations change neither the losses nor the trained weights."""
    want_losses, want_params, _, _ = distributed(_train_adapter, 2, kind, "none", False, timeout=200)[0]
    for checkpointed in (False, True):
        for losses, params, units, tied in distributed(_train_adapter, 2, kind, shard, checkpointed, timeout=200):
            layers = ["FSDPLlamaDecoderLayer"] * 2 if kind == "llama" else \
                ["FSDPEmbedding", "FSDPQwen2DecoderLayer", "FSDPQwen2DecoderLayer", "FSDPLinear"]
            assert units == [*layers, "FSDPCausalLMAdapter"]
            for step, (got, want) in enumerate(zip(losses, want_losses)):
                assert abs(got - want) <= 1e-12, (checkpointed, step, got, want)
            assert params.keys() == want_params.keys()
            for name, p in params.items():
                error = (p - want_params[name]).abs().max().item()
                assert error <= 1e-12, f"{name} (checkpointed={checkpointed}): {error:.2e}"
            assert tied == (kind == "llama")  # Llama's pair: one tensor, sharded once, still shared


def test_activation_checkpointing_recomputes_hf_decoder_layers():
    """One process, float64: with each decoder layer checkpointed, the loss
    and every gradient equal the plain model's exactly; the checkpointed
    forwards run again in the backward (counted)."""
    from loom.launch.hf_model import CausalLMAdapter
    from loom.parallel import apply_activation_checkpointing
    ids, _ = _batch()
    results = []
    for checkpointed in (False, True):
        model = CausalLMAdapter(_model("llama"))
        calls = []
        for layer in model.blocks:
            layer.register_forward_pre_hook(lambda m, a: calls.append(1))
        if checkpointed:
            apply_activation_checkpointing(model)
        loss = model(ids).logsumexp(-1).mean()
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)))
    (plain, plain_grads, plain_calls), (mine, grads, calls) = results
    assert mine == plain and plain_calls == 2
    for name, g in grads.items():
        assert torch.equal(g, plain_grads[name]), name


# ------------------------------------------------------------------ MoE models under expert parallelism

def _hf_named(model, tensors: dict) -> dict:
    """``tensors`` keyed by ``model``'s parameter names (loom's `SparseMoE`
    layout, this rank's experts) -> transformers' names and layout:
    ``{name: (tensor, expert slice or None)}``."""
    from loom.parallel.hf_moe import SparseMoE, experts_to_hf
    out = {}
    blocks = {name: m for name, m in model.named_modules() if isinstance(m, SparseMoE)}
    for name, t in tensors.items():
        prefix = name.rsplit(".moe.", 1)[0]
        if prefix in blocks and ".moe." in name:
            moe = blocks[prefix].moe
            if name.endswith("router.weight"):
                out[f"{prefix}.gate.weight"] = (t, None)
            elif name.endswith("w_gate"):
                mine = slice(moe.ep_rank * moe.experts_per_rank, (moe.ep_rank + 1) * moe.experts_per_rank)
                gate_up, down = experts_to_hf(*(tensors[f"{prefix}.moe.{w}"] for w in ("w_gate", "w_up", "w_down")))
                out[f"{prefix}.experts.gate_up_proj"] = (gate_up, mine)
                out[f"{prefix}.experts.down_proj"] = (down, mine)
        else:
            out[name] = (t, None)
    return out


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_replaced_sparse_block_equals_the_original(kind):
    from loom.parallel.hf_moe import SparseMoE, replace_sparse_blocks, restore_sparse_blocks
    model = _model(kind)
    block = model.model.layers[0].mlp
    x = torch.randn(2, 8, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    want = block(x)
    want_dx, = torch.autograd.grad(want.square().sum(), x)
    blocks = replace_sparse_blocks(model)
    assert len(blocks) == (2 if kind == "mixtral" else 1)  # qwen2_moe's layer 1 is dense (mlp_only_layers)
    mine = model.model.layers[0].mlp
    assert isinstance(mine, SparseMoE) and mine.moe.norm_topk == (kind == "mixtral")
    got = mine(x)
    got_dx, = torch.autograd.grad(got.square().sum(), x)
    assert (got - want).abs().max().item() <= 1e-10
    assert (got_dx - want_dx).abs().max().item() <= 1e-10
    # back to transformers' block: the same weights, bit for bit
    assert restore_sparse_blocks(model) == len(blocks)
    again = model.model.layers[0].mlp
    assert type(again) is type(block)
    for name, p in block.named_parameters():
        assert torch.equal(dict(again.named_parameters())[name], p), name


def test_sparse_blocks_refuse_what_they_cannot_honour():
    from loom.parallel.hf_moe import replace_sparse_blocks
    for change, message in (({"router_jitter_noise": 0.1}, "router_jitter_noise"),
                            ({"output_router_logits": True}, "output_router_logits"),
                            ({"hidden_act": "gelu"}, "silu")):
        model = _model("mixtral")
        for key, value in change.items():
            setattr(model.config, key, value)
        with pytest.raises(ValueError, match=message):
            replace_sparse_blocks(model)
    with pytest.raises(ValueError, match="no sparse MoE block"):
        replace_sparse_blocks(_model("llama"))
    with pytest.raises(ValueError, match="moe="):
        replace_sparse_blocks(_model("mixtral"), dispatcher="fast")
    from loom.parallel.hf_moe import experts_from_hf, experts_to_hf
    gate_up, down = torch.randn(3, 8, 5), torch.randn(3, 5, 4)
    assert all(torch.equal(a, b) for a, b in zip(experts_to_hf(*experts_from_hf(gate_up, down)), (gate_up, down)))
    for bad in ((gate_up[0], down), (gate_up[:, :7], down), (gate_up, down[..., :3])):
        with pytest.raises(ValueError, match="not \\[E, 2\\*I, dim\\]"):
            experts_from_hf(*bad)


def _parallel_moe(kind: str, dp: int, sp: int, ep: int, dispatcher: str):
    from loom.parallel import LLEPConfig
    from loom.parallel.hf import parallelize
    mesh = comms.init_mesh(dp=dp, sp=sp, ep=ep)
    model = _model(kind)
    # LLEP at any imbalance, moving even one slot: the tiny batch borrows experts
    loss, grads = _step(parallelize(model, mesh, moe=dispatcher, llep=LLEPConfig(lam=1.0, min_chunk=1)), dp)
    moved = sum(m.last_stats["weights_moved"] for m in model.modules() if hasattr(m, "last_plan"))
    return loss, _hf_named(model, grads), moved


@pytest.mark.timeout(240)
@pytest.mark.parametrize("kind,dp,sp,ep,dispatcher", [("mixtral", 2, 1, 2, "standard"), ("mixtral", 2, 1, 2, "llep"),
                                                      ("qwen2_moe", 1, 2, 2, "llep")])
def test_expert_parallel_equals_one_process(distributed, kind, dp, sp, ep, dispatcher):
    """ep=2 over 2 ranks (dp=2, or sp=2: each rank its sequence shard's
    tokens): the loss and every gradient equal the one-process transformers
    model's (experts compared on each rank's slice)."""
    want_loss, want_grads = _reference(kind)
    per_rank = distributed(_parallel_moe, dp * sp, kind, dp, sp, ep, dispatcher, timeout=200)
    for loss, grads, moved in per_rank:
        assert abs(loss - want_loss) <= 1e-10, (loss, want_loss)
        assert grads.keys() == want_grads.keys()
        for name, (g, rows) in grads.items():
            want = want_grads[name] if rows is None else want_grads[name][rows]
            error = (g - want).abs().max().item()
            assert error <= 1e-10, f"{name}: {error:.2e} from the one-process gradient"
    if dispatcher == "llep":
        assert sum(moved for _, _, moved in per_rank) > 0, "LLEP moved no expert: the test did not exercise it"


def _train(overrides):
    from helpers import EventLog

    from loom.launch.config import build_config, validate
    from loom.launch.train import train
    summary = train(validate(build_config(overrides=overrides)), EventLog())
    return summary["losses"]


@pytest.mark.timeout(300)
def test_loom_train_hf_moe_ep2_checkpoint_resumes_at_ep1_and_exports(distributed, tmp_path):
    """The launcher's path (`loom.launch.train.train`, in-process): a Mixtral
    ``--hf-config`` at dp=2 × ep=2 with LLEP checkpoints step 3; resumed on
    one rank (ep=1) its losses equal an uninterrupted one-rank run's; the
    checkpoint exported (`export_hf`) loads with ``from_pretrained`` and gives
    loom's logits exactly."""
    from loom import checkpoint
    from loom.launch.config import build_config
    from loom.launch.hf_model import build_hf_model, export_hf
    path = _save(tmp_path, "mixtral")
    url = str(tmp_path / "ck")
    base = {"hf_config": str(path), "data": "synthetic", "seq_len": 16, "batch_size": 4, "dtype": "float64",
            "progress": False, "eval_every": 0, "lr": 1e-2}
    first = distributed(_train, 2, {**base, "dp": 2, "ep": 2, "moe": "llep", "llep_lam": 1.0, "llep_min_chunk": 1,
                                    "steps": 3, "ckpt_every": 3, "ckpt_url": url}, timeout=240)[0]
    resumed = distributed(_train, 1, {**base, "dp": 1, "steps": 5, "ckpt_url": url, "resume": True}, timeout=240)[0]
    one = distributed(_train, 1, {**base, "dp": 1, "steps": 5}, timeout=240)[0]
    assert first + resumed == pytest.approx(one, rel=1e-10, abs=0)
    # the store holds the experts as one global [E, dim, I] tensor, saved in ep parts
    manifest = checkpoint.CheckpointStore(url).read_manifest(3)
    assert tuple(manifest.tensors["model/lm.model.layers.0.mlp.moe.w_gate"].shape) == (4, 32, 24)
    out = tmp_path / "exported"
    assert "MixtralForCausalLM" in export_hf(url, str(out))
    exported = transformers.AutoModelForCausalLM.from_pretrained(out, experts_implementation="eager")
    assert exported.dtype == torch.float64
    mine = build_hf_model(build_config(overrides=dict(hf_config=str(path)))).double()
    checkpoint.load({"model": mine.state_dict()}, url, step=3)
    ids, _ = _batch()
    torch.testing.assert_close(exported(input_ids=ids).logits, mine(ids), atol=0, rtol=0)


def test_hf_moe_config_sets_the_experts_and_dense_models_refuse_ep(tmp_path):
    from loom.launch.config import build_config, validate
    from loom.launch.user_model import user_model_problems
    cfg = validate(build_config(overrides=dict(hf_config=str(_save(tmp_path, "mixtral")), dp=2, ep=2,
                                               data="synthetic")))  # (byte-level text exceeds its vocab of 64)
    assert (cfg.model.num_experts, cfg.model.top_k, cfg.model.moe) == (4, 2, "standard")  # always loom's MoE
    assert user_model_problems(cfg) == []
    cfg = build_config(overrides=dict(hf_config=str(_save(tmp_path, "qwen2_moe")), moe="llep"))
    assert (cfg.model.num_experts, cfg.model.moe) == (4, "llep")
    dense = build_config(overrides=dict(hf_config=str(_save(tmp_path)), dp=2, ep=2, moe="standard"))
    assert any("has no experts" in p for p in user_model_problems(dense))


def test_loom_imports_and_builds_its_own_model_without_transformers():
    """transformers is an optional extra: with it hidden, loom's modules
    (loom.parallel.hf and loom.launch.hf_model included) import, the reference
    model trains a step, and --hf-config says which extra to install."""
    import subprocess
    import sys
    code = """
import sys
sys.modules["transformers"] = None      # as if it were not installed
import torch
import loom, loom.parallel, loom.launch, loom.parallel.hf, loom.launch.hf_model
from loom.launch.config import build_config
from loom.launch.train import build_model
cfg = build_config(overrides=dict(vocab=32, dim=16, layers=1, heads=2))
model = build_model(cfg, torch.device("cpu"))
model(torch.zeros(1, 4, dtype=torch.long)).sum().backward()
try:
    loom.launch.hf_model.build_hf_model(build_config(overrides=dict(hf_config=sys.argv[1])))
except ValueError as exc:
    print(exc)
"""
    import tempfile
    with tempfile.TemporaryDirectory() as tmp:
        _config("llama").save_pretrained(tmp)
        proc = subprocess.run([sys.executable, "-c", code, tmp], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert 'pip install -e ".[hf]"' in proc.stdout, proc.stdout
