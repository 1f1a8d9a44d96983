"""Data loading: what one rank's loader delivers, against a plain
`torch.utils.data.DataLoader` and against the training step it feeds.

    python benchmarks/data_loading.py [--mb 4] [--batches 200] [--rounds 3]

A synthetic corpus (``--mb`` MB of English: `pydoc_data.topics`, one
document per topic, repeated) is written to a temporary directory as text
(``.txt`` with the blank-line rule, ``.parquet``) and prepared once with
`loom.data.prepare` into a memory-mapped ``.bin``.  Rows:

- ``memmap .bin (prepared)``: `open_corpus` on the prepared token file;
- ``text .txt``: the text opened directly (tokenised at open, in memory);
- ``parquet``: the parquet file opened directly (pyarrow + tokenise at open);
- ``torch DataLoader (memmap)``: a plain Dataset over the same `np.memmap`
  returning random windows, ``DataLoader(batch_size=8, shuffle=True,
  num_workers=0)`` -- what a user would otherwise write (no document
  boundaries).

Every loom row times what one rank of the default job (global batch 16 over
dp=2, seq_len 64, byte-level) needs per step: `TokenWindows.batch` for its 8
samples plus their ``cu_seqlens``.  Opening (tokenising) is timed apart.
The step is one training step of loom's default model
(`loom.parallel.Transformer(ModelConfig())`, batch 8 x 64, AdamW, one
intra-op thread as ``--threads-per-worker 1``) in this process; the share is
loader time / step time (must be <= 2%).  Medians over ``--rounds``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from _report import command_line, machine, markdown_table, update_results, write_json  # noqa: E402

from loom.data import TokenWindows, open_corpus, prepare  # noqa: E402
from loom.parallel import ModelConfig, Transformer  # noqa: E402

GLOBAL_BATCH, DP, SEQ = 16, 2, 64
RANK_BATCH = GLOBAL_BATCH // DP


def make_corpus(directory: str, megabytes: float) -> dict:
    """The pydoc topics repeated to ``megabytes`` MB as .txt and .parquet; their paths."""
    from pydoc_data.topics import topics
    docs = [topics[k].strip() for k in sorted(topics) if topics[k].strip()]
    out, size, i = [], 0, 0
    while size < megabytes * 1e6:
        doc = docs[i % len(docs)]
        out.append(doc)
        size += len(doc.encode("utf-8"))
        i += 1
    txt = os.path.join(directory, "corpus.txt")
    with open(txt, "w", encoding="utf-8") as fh:
        fh.write("\n\n\n".join(out) + "\n")  # two blank lines between documents
    paths = {"txt": txt, "documents": len(out), "bytes": size}
    import pyarrow as pa
    import pyarrow.parquet as pq
    paths["parquet"] = os.path.join(directory, "corpus.parquet")
    pq.write_table(pa.table({"text": out}), paths["parquet"])
    return paths


def time_loader(windows: TokenWindows, batches: int, rank: int = 0) -> float:
    """Seconds per rank batch (inputs, targets, cu_seqlens), over ``batches`` steps."""
    indices = range(rank * RANK_BATCH, (rank + 1) * RANK_BATCH)
    t0 = time.perf_counter()
    for step in range(batches):
        inputs, targets = windows.batch(step, indices)
        windows.cu_seqlens(step, indices)
    return (time.perf_counter() - t0) / batches


class MemmapWindows(torch.utils.data.Dataset):
    """The plain-PyTorch peer: random windows of seq_len + 1 tokens of a memmap."""

    def __init__(self, path: str, dtype, seq_len: int):
        self.tokens, self.seq_len = np.memmap(path, dtype=dtype, mode="r"), seq_len

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i):
        a = i * self.seq_len
        return torch.from_numpy(self.tokens[a:a + self.seq_len + 1].astype(np.int64))


def time_dataloader(path: str, dtype, batches: int) -> float:
    loader = torch.utils.data.DataLoader(MemmapWindows(path, dtype, SEQ), batch_size=RANK_BATCH, shuffle=True,
                                         num_workers=0, generator=torch.Generator().manual_seed(0))
    it = iter(loader)
    t0 = time.perf_counter()
    for _ in range(batches):
        try:
            seqs = next(it)
        except StopIteration:
            it = iter(loader)
            seqs = next(it)
        inputs, targets = seqs[:, :-1], seqs[:, 1:]  # what a training step takes
        assert inputs.shape == targets.shape == (RANK_BATCH, SEQ)
    return (time.perf_counter() - t0) / batches


def time_step(windows: TokenWindows, steps: int, warmup: int = 3) -> list[float]:
    """Seconds per training step of the default model on this rank's batch (data prepared outside)."""
    torch.manual_seed(0)
    cfg = ModelConfig()
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = [windows.batch(s, range(RANK_BATCH)) for s in range(steps + warmup)]
    times = []
    for s, (inputs, targets) in enumerate(batches):
        t0 = time.perf_counter()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if s >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=float, default=4.0, help="corpus size in MB of text")
    ap.add_argument("--batches", type=int, default=200, help="rank batches per loader measurement")
    ap.add_argument("--steps", type=int, default=20, help="training steps timed")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=None, help="JSON file (default benchmarks/results/data_loading.json)")
    ap.add_argument("--no-results-md", action="store_true", help="do not rewrite benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)  # loom train's default --threads-per-worker

    with tempfile.TemporaryDirectory() as tmp:
        src = make_corpus(tmp, args.mb)
        t0 = time.perf_counter()
        meta = prepare(src["txt"], os.path.join(tmp, "prepared"), workers=1)
        prepare_s = time.perf_counter() - t0
        bin_path = os.path.join(tmp, "prepared.bin")
        sources = {"memmap .bin (prepared)": bin_path, "text .txt": src["txt"], "parquet": src["parquet"]}
        opened, open_s = {}, {}
        for name, path in sources.items():
            t0 = time.perf_counter()
            opened[name] = open_corpus(path)
            open_s[name] = time.perf_counter() - t0
        assert len(opened["text .txt"]) == len(opened["memmap .bin (prepared)"]) == meta["tokens"]
        windows = {n: TokenWindows(c, SEQ, GLOBAL_BATCH, seed=0) for n, c in opened.items()}

        per_batch = {n: [] for n in [*windows, "torch DataLoader (memmap)"]}
        steps: list[float] = []
        for _ in range(args.rounds):  # interleaved, so machine noise hits every row alike
            for n, w in windows.items():
                per_batch[n].append(time_loader(w, args.batches))
            per_batch["torch DataLoader (memmap)"].append(time_dataloader(bin_path, np.uint16, args.batches))
            steps += time_step(windows["memmap .bin (prepared)"], args.steps)

    step_s = statistics.median(steps)
    base = statistics.median(per_batch["torch DataLoader (memmap)"])
    rows, results = [], {}
    for n, ts in per_batch.items():
        t = statistics.median(ts)
        results[n] = {"open_s": open_s.get(n), "batch_s": t, "tokens_per_s": RANK_BATCH * SEQ / t,
                      "vs_dataloader": base / t, "share_of_step": t / step_s, "rounds": ts}
        rows.append([n, "-" if n not in open_s else f"{open_s[n]:.2f}", f"{t * 1e3:.3f}",
                     f"{RANK_BATCH * SEQ / t / 1e6:.2f}", f"{base / t:.2f}x", f"{100 * t / step_s:.2f}%"])
    worst = max(r["share_of_step"] for n, r in results.items() if n in windows)
    payload = {"args": vars(args), "corpus": {"documents": src["documents"], "bytes": src["bytes"],
                                              "tokens": meta["tokens"], "prepare_s": prepare_s},
               "rank_batch": RANK_BATCH, "seq_len": SEQ, "dp": DP, "step_s": step_s, "steps": steps,
               "results": results, "worst_loom_share_of_step": worst}
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"machine": machine(), **payload}, fh, indent=2)
        out = args.out
    else:
        out = write_json("data_loading", payload)
    table = markdown_table(["source", "open (s)", "rank batch (ms)", "Mtokens/s per rank", "vs DataLoader",
                            "share of step"], rows)
    body = (f"{table}\n\nCorpus: {args.mb:g} MB of `pydoc_data.topics` text ({src['documents']} documents, "
            f"{meta['tokens']:,} byte tokens); `loom data prepare` took {prepare_s:.2f} s (1 worker). "
            f"A rank batch is {RANK_BATCH} windows of {SEQ} + 1 tokens with their `cu_seqlens` (the default job: "
            f"global batch {GLOBAL_BATCH}, dp={DP}); the DataLoader row gives windows only. \"open\" is "
            f"`open_corpus` (text and parquet: tokenised then, in memory). One training step of the default "
            f"model on that batch (AdamW, 1 thread) takes {step_s * 1e3:.1f} ms; the loader's share is its "
            f"batch time over that (target <= 2%; worst loom row {100 * worst:.2f}%). \"vs DataLoader\": "
            f"DataLoader batch time / row batch time (above 1: faster).")
    if not args.no_results_md:
        update_results("data_loading", "Data loading: loom.data loader vs torch DataLoader, share of the step",
                       command_line(__file__), body)
    print(table)
    print(f"step {step_s * 1e3:.1f} ms; worst loom share {100 * worst:.2f}%; wrote {out}")


if __name__ == "__main__":
    main()
