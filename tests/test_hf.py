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
    in float32)."""
    import types

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(_config(kind), attn_implementation="sdpa").double()
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
    mesh = comms.init_mesh(dp=dp, sp=sp)
    model = _model(kind)
    lm = parallelize(model, mesh, sp_attention=attention)
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
                                                  ("qwen2", 2, 2, "ring")])
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
