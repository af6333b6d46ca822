"""Data: the JSONL manifest path (images made on the fly with Pillow), THD packing, which samples
a rank reads, the synthetic task, and the CLI end to end in one process (manifest, plot, parity
exit status) and on spawned processes (--compare)."""

import json

import pytest
import torch
from PIL import Image

from hpcomm.trainer import train as train_mod
from hpcomm.trainer.data import (BOS, EOS, IGNORE, IMG, ManifestDataset, SyntheticDataset,
                                 decode, pack, patchify, rank_share, step_indices)

# (width, height) on disk -> (width, height) after scaling to max_side=32 and flooring to the patch
SIZES = {(20, 12): (20, 12), (64, 16): (32, 8), (3, 50): (4, 32), (33, 33): (32, 32)}


@pytest.fixture(autouse=True)
def one_thread():
    """In-process training on a shared 2-core machine: OpenMP threads that spin against other
    processes slow these tests down tenfold."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def manifest(tmp_path):
    with open(tmp_path / "data.jsonl", "w") as f:
        for i, (w, h) in enumerate(SIZES):
            colour = (255, 0, 0) if i % 2 else (0, 0, 255)
            Image.new("RGB", (w, h), colour).save(tmp_path / f"img{i}.png")
            f.write(json.dumps({"image": f"img{i}.png", "text": f"picture {i} é"}) + "\n")
    return str(tmp_path / "data.jsonl")


def test_manifest_images_and_captions(manifest):
    ds = ManifestDataset(manifest, patch=4, max_side=32)
    assert len(ds) == len(SIZES)
    for i, (w, h) in enumerate(SIZES.values()):
        sample = ds[i]
        assert sample.image.shape == (3, h, w)
        assert sample.text == f"picture {i} é"
        red = i % 2 == 1
        assert sample.image[0].mean().item() == pytest.approx(1.0 if red else 0.0)
        assert sample.image[2].mean().item() == pytest.approx(0.0 if red else 1.0)


def test_pack_rows_targets_and_patches(manifest):
    ds = ManifestDataset(manifest, patch=4, max_side=32)
    samples = [ds[i] for i in range(len(ds))]
    batch = pack(samples, patch=4)
    counts = [(w // 4) * (h // 4) for w, h in SIZES.values()]
    assert batch.patch_counts == counts
    assert batch.patches.shape == (sum(counts), 48)
    assert int((batch.tokens == IMG).sum()) == sum(counts)
    start = 0
    for sample, n, seq_len in zip(samples, counts, batch.seq_lens):
        text = sample.text.encode()
        assert seq_len == 2 + n + len(text)
        seq = batch.tokens[start:start + seq_len].tolist()
        assert seq == [BOS] + [IMG] * n + list(text) + [EOS]
        assert decode(seq) == sample.text
        assert batch.positions[start:start + seq_len].tolist() == list(range(seq_len))
        targets = batch.targets[start:start + seq_len].tolist()
        # the loss covers exactly the caption and EOS, each predicted from the row before it
        assert targets == [IGNORE] * n + seq[n + 1:] + [IGNORE]
        start += seq_len
    # the trainer counts targets from the lengths alone: seq_len - patches - 1 per sample
    num_targets = sum(t - p - 1 for t, p in zip(batch.seq_lens, batch.patch_counts))
    assert int((batch.targets != IGNORE).sum()) == num_targets
    assert num_targets == sum(len(s.text.encode()) + 1 for s in samples)
    # patch rows follow the image pixels in row-major patch order
    image = samples[0].image
    assert torch.equal(batch.patches[1].view(3, 4, 4), image[:, 0:4, 4:8])
    assert batch.patch_grid[:counts[0]].tolist()[:2] == [[0, 0], [0, 1]]


def test_patchify_roundtrip():
    image = torch.rand(3, 8, 12)
    patches, grid = patchify(image, 4)
    assert patches.shape == (6, 48) and grid.tolist()[-1] == [1, 2]
    rebuilt = patches.view(2, 3, 3, 4, 4).permute(2, 0, 3, 1, 4).reshape(3, 8, 12)
    assert torch.equal(rebuilt, image)


def test_step_indices_cover_epoch_once(manifest):
    ds = ManifestDataset(manifest, patch=4)
    parts = step_indices(ds, 0, 4, 3, seed=1)
    assert [len(p) for p in parts] == [2, 1, 1]  # tensor_split of 4 samples
    assert sorted(i for p in parts for i in p) == [0, 1, 2, 3]


def test_rank_shares_partition_in_order():
    """Ranks read contiguous parts, so ascending rank order is the dataset order; a rank may
    read nothing."""
    parts = [[7, 3, 9], [4, 5, 6]]  # two micro-batches
    shares = [rank_share(parts, r, 4) for r in range(4)]
    assert shares == [[[7, 3], []], [[9], [4]], [[], [5]], [[], [6]]]
    assert rank_share([[1]], 3, 4) == [[]]


def test_synthetic_task_varies_and_is_deterministic():
    ds = SyntheticDataset(seed=3)
    a, b = ds[5], SyntheticDataset(seed=3)[5]
    assert torch.equal(a.image, b.image) and a.text == b.text
    samples = [ds[i] for i in range(40)]
    assert len({s.image.shape for s in samples}) > 3  # different patch counts
    assert len({s.text for s in samples}) > 10
    assert all(s.text.startswith("a ") for s in samples)


def test_cli_single_process_manifest_and_plot(manifest, tmp_path, capsys):
    plot = tmp_path / "loss.png"
    assert train_mod.main(["--nproc", "1", "--data", manifest, "--steps", "2", "--batch-size", "4",
                           "--plot", str(plot), "--check-parity"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert "parity: max |Δloss| = 0.000e+00 over 2 steps" in lines
    assert lines[-1] == f"wrote the loss curve to {plot}"  # a command that writes a file says where
    assert plot.stat().st_size > 1000


def test_synthetic_task_is_learned():
    """A single-process run: the caption loss falls well below the uniform-byte loss (ln 259)."""
    result = train_mod.train(train_mod.TrainConfig(steps=30, micro_batches=1), progress=False)
    assert result["losses"][0] > 5.0
    assert result["losses"][-1] < 1.5


def test_cli_parity_failure_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(train_mod, "PARITY_TOLERANCE", -1.0)  # any error, even 0, now fails
    assert train_mod.main(["--nproc", "1", "--steps", "1", "--batch-size", "2",
                           "--check-parity"]) == 1


def test_cli_compare_prints_table_and_plots(tmp_path, capsys):
    """--compare end to end on 2 processes: baseline, colocated and non-colocated rows, all at
    parity with the single-process run, and the plot."""
    plot = tmp_path / "compare.png"
    assert train_mod.main(["--compare", "--nproc", "2", "--steps", "2", "--batch-size", "4",
                           "--plot", str(plot)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines[:6:2]] == ["[1/3]", "[2/3]", "[3/3]"]  # announced as they start
    head = next(i for i, line in enumerate(lines) if line.split()[:3] == ["configuration", "step", "ms"])
    rows = [line for line in lines[head + 2:head + 5]]
    assert len(rows) == 3 and rows[0].startswith("homogeneous")
    assert "coloc enc dp=2" in rows[1] and "noncoloc enc dp=1" in rows[2]
    assert all(float(row.split()[-1]) < train_mod.PARITY_TOLERANCE for row in rows)
    assert plot.stat().st_size > 1000
