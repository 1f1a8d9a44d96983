"""Hostile and awkward input to ``--hf-config`` / ``--init-from-hf`` /
``export-hf``: each is a clear ConfigError / ValueError before any training,
never a traceback from deep inside, a hang, or weights silently made up."""
import copy
import json

import pytest
import torch
import transformers

from loom.launch.config import ConfigError, build_config

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(text)
    return str(path)


def _llama(**change):
    return json.dumps({**transformers.LlamaConfig(**SMALL).to_dict(), **change})


@pytest.mark.parametrize("name,text,message", [
    ("deep", '{"model_type": "llama", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests JSON too deeply"),
    ("kv-str", _llama(num_key_value_heads="2"), "num_key_value_heads='2' must be a positive integer"),
    ("kv-zero", _llama(num_key_value_heads=0), "num_key_value_heads=0 must be a positive integer"),
    ("head-dim", _llama(head_dim=-1), "head_dim=-1"),
    ("window", _llama(sliding_window=2.5), "sliding_window=2.5"),
    ("layers", _llama(num_hidden_layers=10**9), "num_hidden_layers=1000000000 is more than"),
    ("vocab", _llama(vocab_size=10**12), "parameters"),
    ("hub kernel", _llama(attn_implementation="kernels-community/flash-attn"), "loads no attention kernels"),
    ("flash", _llama(_attn_implementation="flash_attention_2"), "loads no attention kernels"),
    ("quantized", _llama(quantization_config={"quant_method": "bitsandbytes", "load_in_4bit": True}),
     "unquantized"),
])
def test_hostile_config_values_are_refused_before_anything_is_built(tmp_path, name, text, message):
    with pytest.raises(ConfigError, match=message):
        build_config(overrides=dict(hf_config=_write(tmp_path, name, text)))


def test_absent_key_value_heads_means_as_many_as_query_heads(tmp_path):
    data = json.loads(_llama())
    del data["num_key_value_heads"]
    cfg = build_config(overrides=dict(hf_config=_write(tmp_path, "mha", json.dumps(data))))
    assert cfg.model.kv_heads is None


def _weights(tmp_path, keep=lambda key: True, change=None):
    """A save_pretrained directory whose model.safetensors keeps the weights
    ``keep`` accepts (``change``: key -> replacement tensor)."""
    import safetensors.torch
    path = tmp_path / "weights"
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)).save_pretrained(path)
    state = safetensors.torch.load_file(path / "model.safetensors")
    state = {k: v for k, v in state.items() if keep(k)}
    state.update(change or {})
    safetensors.torch.save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.mark.parametrize("what,kw,message", [
    ("missing layer", dict(keep=lambda k: "layers.1." not in k), "lack 9 and mis-shape 0"),
    ("wrong shape", dict(change={"model.norm.weight": torch.zeros(5)}), "norm.weight"),
])
def test_init_from_hf_refuses_weights_that_do_not_fit_the_config(tmp_path, what, kw, message):
    from loom.launch.hf_model import build_hf_model
    with pytest.raises(ConfigError, match=message):
        build_hf_model(build_config(overrides=dict(init_from_hf=_weights(tmp_path, **kw))))


def test_init_from_hf_refuses_a_damaged_safetensors_file_and_a_pickle_only_directory(tmp_path):
    from loom.launch.hf_model import build_hf_model
    path = _weights(tmp_path)
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"\xff" * 100)
    with pytest.raises(ConfigError, match="--init-from-hf"):
        build_hf_model(build_config(overrides=dict(init_from_hf=path)))
    (tmp_path / "weights" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "weights" / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="model.safetensors"):
        build_hf_model(build_config(overrides=dict(init_from_hf=path)))


def test_init_from_hf_with_a_bigger_hf_config_is_refused(tmp_path):
    from loom.launch.hf_model import build_hf_model
    weights = _weights(tmp_path)
    bigger = _write(tmp_path, "bigger", _llama(num_hidden_layers=3))
    with pytest.raises(ConfigError, match="lack 9"):
        build_hf_model(build_config(overrides=dict(init_from_hf=weights, hf_config=bigger)))


def test_tied_embeddings_load_without_complaint(tmp_path):
    from loom.launch.hf_model import build_hf_model
    path = tmp_path / "tied"
    transformers.AutoModelForCausalLM.from_config(
        transformers.LlamaConfig(tie_word_embeddings=True, **SMALL)).save_pretrained(path)
    model = build_hf_model(build_config(overrides=dict(init_from_hf=str(path))))
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight


def _mistral(tmp_path, window):
    config = transformers.MistralConfig(sliding_window=window, **SMALL)
    path = tmp_path / f"mistral-{window}"
    config.save_pretrained(path)
    return str(path)


def test_mistral_s_default_window_longer_than_the_sequence_trains(tmp_path):
    """MistralConfig's default sliding_window (4096) changes nothing over
    shorter sequences: the model runs, and equals transformers' own."""
    from loom.launch.hf_model import build_hf_model
    from loom.launch.user_model import user_model_problems
    cfg = build_config(overrides=dict(hf_config=_mistral(tmp_path, 4096), seq_len=16))
    assert user_model_problems(cfg) == []
    torch.manual_seed(0)
    model = build_hf_model(cfg).double()
    ids = torch.randint(0, 64, (2, 16))
    logits = model(ids)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(model.lm.config),
                                                              attn_implementation="sdpa")
    reference.load_state_dict(model.lm.state_dict())
    assert model.lm.config._attn_implementation == "loom_sp"
    torch.testing.assert_close(logits, reference.double()(input_ids=ids).logits, atol=1e-6, rtol=0)


def test_a_window_shorter_than_the_sequence_is_refused_before_the_workers_start(tmp_path):
    from loom.launch.hf_model import build_hf_model
    from loom.launch.user_model import user_model_problems
    cfg = build_config(overrides=dict(hf_config=_mistral(tmp_path, 8), seq_len=16))
    problems = user_model_problems(cfg)
    assert len(problems) == 1 and "window 8" in problems[0] and "--seq-len 16" in problems[0], problems
    with pytest.raises(ConfigError, match="window 8"):
        build_hf_model(cfg)
    # parallelize in one's own loop: refused when it runs over positions the window would cut
    cfg = build_config(overrides=dict(hf_config=_mistral(tmp_path, 8), seq_len=8))
    model = build_hf_model(cfg)
    assert model(torch.randint(0, 64, (1, 8))).shape == (1, 8, 64)
    with pytest.raises(ValueError, match="window 8"):
        model(torch.randint(0, 64, (1, 9)))


@pytest.mark.parametrize("hidden,head_dim", [(36, 16), (30, 8)])
def test_a_head_dim_other_than_hidden_over_heads_shapes_the_job(tmp_path, hidden, head_dim):
    """Qwen3-like configs: head_dim is the config's, whatever hidden_size /
    heads is (36 / 4 = 9 is odd, 30 / 4 is no integer): loom's job takes the
    attention's head dim, and the model runs."""
    from loom.launch.hf_model import build_hf_model
    config = transformers.Qwen3Config(**{**SMALL, "hidden_size": hidden}, head_dim=head_dim)
    config.save_pretrained(tmp_path / "qwen3")
    cfg = build_config(overrides=dict(hf_config=str(tmp_path / "qwen3"), seq_len=16))
    assert cfg.model.dim // cfg.model.heads == head_dim
    model = build_hf_model(cfg)
    assert model(torch.randint(0, 64, (1, 16))).shape == (1, 16, 64)


def _autocast_forward(attention):
    """The logits of a float32 Llama (GQA, one K/V head: fewer than sp)
    under bf16 autocast at sp=2, and the one-process float32 logits."""
    from loom import comms
    from loom.parallel.hf import parallelize
    config = transformers.LlamaConfig(**{**SMALL, "num_key_value_heads": 1})
    torch.manual_seed(0)
    reference = transformers.AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    lm = parallelize(model, comms.init_mesh(dp=1, sp=2), sp_attention=attention)
    ids = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = lm.shard(ids)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    want = reference(input_ids=ids).logits.detach()[:, batch["position_ids"][0]]  # this rank's positions
    return (logits.float() - want).abs().max().item(), logits.dtype


@pytest.mark.timeout(120)
@pytest.mark.parametrize("attention", ["ulysses", "ring"])
def test_bf16_autocast_under_sequence_parallelism(distributed, attention):
    """Under autocast, transformers' rotary embedding leaves q and k in
    float32 while v is bf16: loom's attention takes them in autocast's dtype
    (as SDPA would), instead of refusing dtypes that differ."""
    for error, dtype in distributed(_autocast_forward, 2, attention, timeout=100):
        assert error < 0.1, error


def test_a_value_transformers_refuses_is_a_config_error(tmp_path):
    from loom.launch.hf_model import build_hf_model
    cfg = build_config(overrides=dict(hf_config=_write(tmp_path, "drop", _llama(attention_dropout="0.1"))))
    with pytest.raises(ConfigError, match="transformers cannot read it.*attention_dropout"):
        build_hf_model(cfg)


def _hf_checkpoint(tmp_path, text=None):
    """A one-process checkpoint as a --hf-config job saves it (model + hf/config)."""
    from loom import checkpoint
    from loom.launch.hf_model import CausalLMAdapter, hf_config_text
    torch.manual_seed(0)
    model = CausalLMAdapter(transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**SMALL)))
    url = str(tmp_path / "ck")
    checkpoint.save({"model": model.state_dict(), "hf": {"config": text or hf_config_text(model)}}, url, step=1)
    return url, model


@pytest.mark.parametrize("change,error,message", [
    ({"auto_map": {"AutoModelForCausalLM": "evil.Model"}}, ValueError, "runs no code"),
    ({"attn_implementation": "kernels-community/flash-attn"}, ValueError, "loads no attention kernels"),
    ({"num_hidden_layers": 10**6}, ValueError, "more than loom builds"),
    ({"rms_norm_eps": "tiny"}, ValueError, "transformers cannot read it"),
    ({"hidden_size": 64, "head_dim": 16}, Exception, "model/lm.model.embed_tokens.weight|shape"),
])
def test_export_hf_refuses_a_damaged_or_hostile_hf_config(tmp_path, change, error, message):
    from loom.launch.hf_model import export_hf, hf_config_text
    _, model = _hf_checkpoint(tmp_path / "good")
    data = {**json.loads(hf_config_text(model)), **change}
    url, _ = _hf_checkpoint(tmp_path, json.dumps(data))
    with pytest.raises(error, match=message):
        export_hf(url, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_export_hf_round_trips(tmp_path):
    from loom.launch.hf_model import export_hf
    url, model = _hf_checkpoint(tmp_path)
    assert "step 1" in export_hf(url, str(tmp_path / "out"))
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = torch.randint(0, 64, (1, 8))
    torch.testing.assert_close(again(input_ids=ids).logits, model(ids), atol=1e-5, rtol=0)


def test_data_beyond_the_hf_model_s_vocabulary_is_refused_before_the_workers_start(tmp_path):
    """Byte-level text (ids up to 255) for a config with vocab_size 64: the
    driver's data check knows the model's vocabulary from its config.json
    (it used to skip every --model, and the workers hit an IndexError in the
    embedding)."""
    from loom.launch.config import validate
    from loom.launch.datasets import open_job_data
    text = tmp_path / "notes.txt"
    text.write_text("\n\n\n".join(f"document {i}: some text to read" for i in range(64)))
    path = tmp_path / "llama"
    transformers.LlamaConfig(**SMALL).save_pretrained(path)
    cfg = build_config(overrides=dict(hf_config=str(path), data=str(text), seq_len=16, batch_size=2, eval_every=0))
    with pytest.raises(ConfigError, match=r"outside the model's vocabulary \[0, 64\)"):
        validate(cfg)
    job = open_job_data(cfg, 1)  # the workers' sources check every batch against it too
    with pytest.raises(ValueError, match="64"):
        job.train.batch(0, range(2))


@pytest.mark.parametrize("shard", ["../outside/model.safetensors", "/tmp/model.safetensors", "model.bin", 7])
def test_init_from_hf_reads_no_shard_outside_its_directory(tmp_path, shard):
    """A sharded index naming a file elsewhere (or not a safetensors file)
    is refused: transformers would read it."""
    from loom.launch.hf_model import build_hf_model
    outside = _weights(tmp_path)
    (tmp_path / "outside").mkdir()
    (tmp_path / "weights" / "model.safetensors").rename(tmp_path / "outside" / "model.safetensors")
    index = {"metadata": {}, "weight_map": {k: shard for k in ("model.embed_tokens.weight", "model.norm.weight")}}
    (tmp_path / "weights" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="not a .safetensors file of"):
        build_hf_model(build_config(overrides=dict(init_from_hf=outside)))


def test_init_from_hf_without_safetensors_is_refused_before_the_workers_start(tmp_path):
    from loom.launch.user_model import user_model_problems
    path = _weights(tmp_path)
    (tmp_path / "weights" / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, tmp_path / "weights" / "pytorch_model.bin")
    problems = user_model_problems(build_config(overrides=dict(init_from_hf=path)))
    assert len(problems) == 1 and "never a pickle" in problems[0], problems


def test_attention_features_loom_does_not_implement_are_refused_not_ignored():
    """Gemma 2 asks the attention for a logit softcap, gpt-oss for attention
    sinks (s_aux): ignored, the model would silently be another one."""
    from loom.launch.hf_model import CausalLMAdapter
    ids = torch.randint(0, 64, (1, 8))
    gemma2 = transformers.Gemma2Config(**SMALL, head_dim=8)
    with pytest.raises(ValueError, match="softcap=50.0"):
        CausalLMAdapter(transformers.AutoModelForCausalLM.from_config(gemma2))(ids)
    gemma2.attn_logit_softcapping = None  # without the softcap it runs
    model = CausalLMAdapter(transformers.AutoModelForCausalLM.from_config(gemma2))
    assert model(ids).shape == (1, 8, 64)
    if hasattr(transformers, "GptOssConfig"):
        oss = transformers.GptOssConfig(**SMALL, head_dim=8, num_local_experts=2, num_experts_per_tok=1)
        with pytest.raises(ValueError, match="s_aux=<tensor"):
            CausalLMAdapter(transformers.AutoModelForCausalLM.from_config(oss))(ids)
