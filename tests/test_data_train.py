"""`loom train --data`: real corpora through every parallel layout, resumes,
document masking on the training path, the built-in default, bad input."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from loom.launch.config import ConfigError, build_config, validate

VOCAB = 64
TINY = dict(vocab=VOCAB, dim=16, heads=2, layers=2, seq_len=16, batch_size=4, dtype="float64", lr=1e-2,
            warmup_steps=1, progress=False, val_fraction=0.1)


def token_file(path, lengths, vocab=VOCAB, seed=0, index=True):
    """A token file ``path`` (.npy, uint16) of documents of ``lengths`` tokens,
    with its document index ``<stem>.docs.npy``."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=sum(lengths)).astype(np.uint16)
    np.save(path, tokens)
    if index:
        np.save(str(path)[:-len(".npy")] + ".docs.npy", np.cumsum([0] + list(lengths[:-1])).astype(np.int64))
    return str(path)


def short_documents(tmp_path, count=150, seed=0):
    """Documents of 3..40 tokens: most windows of 16 hold several."""
    lengths = np.random.default_rng(seed + 1).integers(3, 41, size=count).tolist()
    return token_file(tmp_path / "docs.npy", lengths, seed=seed)


def _train(overrides):
    import torch.distributed as dist
    from loom.launch.train import train
    cfg = validate(build_config(overrides=overrides), world_size=dist.get_world_size())
    summary = train(cfg)
    return summary["losses"], summary.get("extra", {})


def _train_many(base, runs):
    return [_train({**base, **run}) for run in runs]


@pytest.mark.timeout(400)
def test_every_layout_trains_on_the_same_batches_float64(distributed, tmp_path):
    """dp=1, dp=2, dp=1 x sp=2 (ring zigzag, Ulysses) and dp=2 x ep=2 give the
    same losses and held-out loss (1e-10) on a corpus of short documents,
    attention within documents; with --cross-document-attention too."""
    base = {**TINY, "data": short_documents(tmp_path), "steps": 3, "eval_every": 3, "eval_batches": 1}
    moe = dict(moe="standard", num_experts=4, top_k=2, moe_aux_coef=0.0)
    cross = dict(cross_document_attention=True)
    single = distributed(_train_many, 1, base, [dict(dp=1), dict(dp=1, **moe), dict(dp=1, **cross)],
                         timeout=150)[0]
    two = distributed(_train_many, 2, base, [
        dict(dp=2), dict(dp=1, sp=2), dict(dp=1, sp=2, sp_attention="ulysses"), dict(dp=2, ep=2, **moe),
        dict(dp=1, sp=2, **cross)], timeout=300)
    reference = [single[0]] * 3 + [single[1], single[2]]
    for rank_runs in two:
        for (losses, extra), (ref_losses, ref_extra) in zip(rank_runs, reference):
            assert np.allclose(losses, ref_losses, rtol=0, atol=1e-10), (losses, ref_losses)
            assert abs(extra["eval_loss"] - ref_extra["eval_loss"]) < 1e-6  # rounded to 6 places
    assert single[0][0][-1] < single[0][0][0]
    # the documents matter: packing them with cross-document attention is another computation
    assert abs(single[0][0][0] - single[2][0][0]) > 1e-6


@pytest.mark.timeout(400)
def test_resume_in_the_middle_of_an_epoch_repeats_the_uninterrupted_run(distributed, tmp_path):
    data = token_file(tmp_path / "small.npy", [30, 9, 50, 17, 44, 60, 12, 25])  # 247 tokens: 15 windows
    base = {**TINY, "data": data, "val_fraction": 0.0, "eval_every": 0, "batch_size": 4, "seq_len": 16}
    steps = 9  # an epoch is 15 windows = 3.75 steps: the run crosses two epoch boundaries
    reference, _ = distributed(_train, 2, {**base, "steps": steps}, timeout=150)[0]
    url = str(tmp_path / "ck")
    first, _ = distributed(_train, 2, {**base, "steps": 5, "ckpt_every": 5, "ckpt_url": url}, timeout=150)[0]
    resumed, extra = distributed(_train, 2, {**base, "steps": steps, "ckpt_url": url, "resume": True},
                                 timeout=150)[0]
    assert extra["start_step"] == 5
    assert first + resumed == reference
    # resumed at another layout (sequence parallel, ring): the same samples, the same losses
    other, extra = distributed(_train, 2, {**base, "steps": steps, "ckpt_url": url, "resume": True, "dp": 1,
                                           "sp": 2}, timeout=150)[0]
    assert extra["start_step"] == 5
    assert np.allclose(first + other, reference, rtol=0, atol=1e-10)
    # other data (another seed draws other windows): refused, unless asked for
    with pytest.raises(Exception, match="saved drawing samples from other data"):
        distributed(_train, 2, {**base, "steps": steps, "ckpt_url": url, "resume": True, "seed": 9},
                    timeout=150)
    changed, extra = distributed(_train, 2, {**base, "steps": 6, "ckpt_url": url, "resume": True, "seed": 9,
                                             "allow_data_change": True}, timeout=150)[0]
    assert extra["start_step"] == 5 and len(changed) == 1


def _logits_with_one_document_changed(cfg_overrides, perturb_first_document: bool):
    """This rank's logits for global batch 0 (2 rows, sp=2 ring), with the
    tokens of row 0's first document changed or not, through the training
    path's data (TokenWindows), sharding and model."""
    import torch.distributed as dist
    from loom import comms
    from loom.launch.batches import rank_batch
    from loom.launch.config import sp_layout
    from loom.launch.datasets import open_job_data
    from loom.launch.train import build_model
    from loom.parallel import enable_sequence_parallel, sequence_parallel_core
    cfg = validate(build_config(overrides=cfg_overrides), world_size=dist.get_world_size())
    mesh = comms.init_mesh(1, 2, 1)
    model = build_model(cfg, torch.device("cpu"))
    layout = sp_layout(cfg)
    enable_sequence_parallel(model, list(mesh.sp_ranks), softmax_core=sequence_parallel_core(
        "ring", ranks=mesh.sp_ranks, group=mesh.sp_group, layout=layout))
    data = open_job_data(cfg, 2).train
    inputs, _, context = rank_batch(data, 0, range(2), mesh, layout, torch.device("cpu"))
    from loom.data import TokenWindows
    # the documents of the same windows (also when the job attends across them)
    cu = TokenWindows(data.corpus, data.seq_len, data.batch_size, seed=data.seed).cu_seqlens(0, range(2))
    first_end = int(cu[1])  # row 0's first document: global positions [0, first_end)
    positions = context["positions"]
    in_first = positions < first_end
    if perturb_first_document:
        inputs = inputs.clone()
        inputs[0, in_first] = (inputs[0, in_first] + 1) % VOCAB
    with torch.no_grad():
        logits = model(inputs, **context)
    return logits, in_first, first_end


def _document_masking(overrides):
    a, in_first, first_end = _logits_with_one_document_changed(overrides, False)
    b, _, _ = _logits_with_one_document_changed(overrides, True)
    later = (a[0, ~in_first] - b[0, ~in_first]).abs().max().item()
    first = (a[0, in_first] - b[0, in_first]).abs().max().item() if in_first.any() else None
    other_row = (a[1] - b[1]).abs().max().item()
    return later, first, other_row, first_end


@pytest.mark.timeout(200)
def test_tokens_never_attend_across_documents_unless_asked(distributed, tmp_path):
    """Row 0 of batch 0 packs several documents; changing its first document
    changes nothing at the positions of the later ones, under sp=2 ring
    attention on the training path -- unless --cross-document-attention."""
    base = {**TINY, "data": short_documents(tmp_path), "dp": 1, "sp": 2, "seed": 3}
    masked = distributed(_document_masking, 2, base, timeout=150)
    crossed = distributed(_document_masking, 2, {**base, "cross_document_attention": True}, timeout=150)
    first_end = masked[0][3]
    assert 0 < first_end < 16, "the test needs a window holding more than one document"
    for later, first, other_row, _ in masked:
        assert later == 0.0 and other_row == 0.0
        assert first is None or first > 1e-6
    assert max(later for later, *_ in crossed) > 1e-6


@pytest.mark.timeout(300)
def test_hdp_draws_real_documents(distributed, tmp_path):
    """--hdp trains on the corpus's documents at their real lengths: two
    ranks give the single process's losses (float64)."""
    base = {**TINY, "data": short_documents(tmp_path), "hdp": True, "batch_size": 6, "steps": 2, "eval_every": 0,
            "varlen_max": 16}  # the same cut at every world size (its default is world * capacity)
    (single,) = distributed(_train, 1, {**base, "dp": 1}, timeout=150)
    two = distributed(_train, 2, {**base, "dp": 2}, timeout=150)
    for losses, _ in two:
        assert np.allclose(losses, single[0], rtol=0, atol=1e-10)


def _refused(tmp_path, **overrides):
    with pytest.raises(ConfigError) as info:
        validate(build_config(overrides={"progress": False, **overrides}))
    return str(info.value)


def test_bad_data_is_refused_before_any_worker_starts(tmp_path):
    missing = str(tmp_path / "nope.npy")
    assert "nope.npy" in _refused(tmp_path, data=missing)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in _refused(tmp_path, data=str(empty))
    big = tmp_path / "big.npy"
    np.save(big, np.array([1, 2, 300, 4] * 40, dtype=np.uint16))
    assert "token id 300 at offset 2" in _refused(tmp_path, data=str(big))
    bad_index = token_file(tmp_path / "idx.npy", [50, 50])
    np.save(tmp_path / "idx.docs.npy", np.array([0, 40, 120], dtype=np.int64))  # 120 > 100 tokens
    assert "idx.docs.npy" in _refused(tmp_path, data=bad_index, vocab=VOCAB)
    text = tmp_path / "a.txt"
    text.write_text("hello world " * 100)
    junk = tmp_path / "tokenizer.json"
    junk.write_text("{not a tokenizer")
    assert "tokenizer.json" in _refused(tmp_path, data=str(text), tokenizer=str(junk))
    short = token_file(tmp_path / "short.npy", [10, 10])
    assert "shorter than one window" in _refused(tmp_path, data=short, vocab=VOCAB, val_fraction=0.0)
    assert "--eval-every needs held-out data" in _refused(tmp_path, data=short_documents(tmp_path), vocab=VOCAB,
                                                           val_fraction=0.0)
    # gated linear attention layers keep documents apart too (their state restarts): accepted
    hybrid = validate(build_config(overrides={"progress": False, "layers": "linear,softmax"}))
    assert hybrid.model.layer_kinds == ("linear", "softmax") and not hybrid.data.cross_document_attention


def test_cli_names_bad_data_without_starting_workers(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "loom", "train", "--data", str(tmp_path / "missing.bin"),
                           "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "missing.bin" in proc.stderr
    assert "Ray" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.e2e
@pytest.mark.timeout(300)
def test_default_run_learns_english_below_its_unigram_entropy(tmp_path):
    """`loom train` with no data arguments trains on the built-in text and
    reports held-out bits per byte clearly below the text's unigram entropy."""
    proc = subprocess.run([sys.executable, "-m", "loom", "train", "--name", "default", "--runs-dir",
                           str(tmp_path), "--no-progress"], capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "default" / "summary.json").read_text())
    extra = summary["extra"]
    assert extra["eval_bpb"] < extra["unigram_bpb"] - 1.0, extra
    assert "eval bpb" in proc.stdout and "unigram bpb" in proc.stdout
