"""Multimodal data: a learnable synthetic task, a JSONL manifest reader, and THD packing.

A sample is one image and its caption. The LLM sees, per sample,

    BOS, IMG x num_patches, caption bytes, EOS

and learns to predict the caption (and EOS) from the image tokens. Samples are packed back to back
(THD: one flat row dimension plus per-sample lengths, no padding); the encoder's patches are packed
the same way, image after image, so encoder output row i is the i-th IMG token of the packed text.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw

BOS, EOS, IMG = 256, 257, 258
VOCAB_SIZE = 259  # bytes + three specials
IGNORE = -100  # target of rows that carry no loss (image tokens, last row of a sample)


def encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def decode(tokens: list[int]) -> str:
    return bytes(t for t in tokens if t < 256).decode("utf-8", errors="replace")


@dataclass
class Sample:
    image: torch.Tensor  # [3, H, W] float in [0, 1], H and W multiples of the patch size
    text: str


# ---------------------------------------------------------------- synthetic task

COLOURS = {"red": (230, 40, 40), "green": (40, 200, 60), "blue": (50, 80, 240),
           "yellow": (240, 220, 40), "white": (240, 240, 240), "purple": (160, 60, 200)}
SHAPES = ("square", "circle", "triangle", "digit")
# 3x5 bitmaps, rows top to bottom, so digits need no font file.
DIGITS = ("111101101101111", "010110010010111", "111001111100111", "111001111001111",
          "101101111001001", "111100111001111", "111100111101111", "111001001010010",
          "111101111101111", "111101111001111")


class SyntheticDataset:
    """Procedural images of one coloured shape or digit on a dark, noisy background, of varying
    size (so images have different patch counts). Captions name colour and shape, so the task is
    learnable from the image alone. Item i is a pure function of (seed, i)."""

    def __init__(self, seed: int = 0, patch: int = 4, sizes: tuple[int, ...] = (8, 12, 16)) -> None:
        self.seed, self.patch, self.sizes = seed, patch, sizes

    def __getitem__(self, index: int) -> Sample:
        rng = random.Random(self.seed * 1_000_003 + index)
        h, w = rng.choice(self.sizes), rng.choice(self.sizes)
        colour = rng.choice(list(COLOURS))
        shape = rng.choice(SHAPES)
        img = Image.new("RGB", (w, h), tuple(rng.randrange(40) for _ in range(3)))
        draw = ImageDraw.Draw(img)
        side = rng.randint(max(4, min(h, w) // 2), min(h, w))  # bounding box of the figure
        x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
        fill = COLOURS[colour]
        if shape == "square":
            draw.rectangle((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
        elif shape == "circle":
            draw.ellipse((x0, y0, x0 + side - 1, y0 + side - 1), fill=fill)
        elif shape == "triangle":
            draw.polygon([(x0 + side / 2, y0), (x0, y0 + side - 1), (x0 + side - 1, y0 + side - 1)],
                         fill=fill)
        else:
            digit = rng.randrange(10)
            cell = max(1, side // 5)
            for k, bit in enumerate(DIGITS[digit]):
                if bit == "1":
                    cx, cy = x0 + (k % 3) * cell, y0 + (k // 3) * cell
                    draw.rectangle((cx, cy, cx + cell - 1, cy + cell - 1), fill=fill)
            shape = f"digit {digit}"
        text = f"a {colour} {shape}"
        return Sample(to_tensor(img), text)


# ---------------------------------------------------------------- real data

def to_tensor(img: Image.Image) -> torch.Tensor:
    data = torch.frombuffer(bytearray(img.convert("RGB").tobytes()), dtype=torch.uint8)
    return data.view(img.height, img.width, 3).permute(2, 0, 1).float() / 255


class ManifestDataset:
    """JSONL lines {"image": path, "text": caption}; relative paths are relative to the manifest.
    Images keep their aspect ratio: scaled so the longer side is at most max_side, then each side
    is rounded down to a multiple of the patch size (at least one patch)."""

    def __init__(self, manifest: str, patch: int = 4, max_side: int = 32) -> None:
        root = os.path.dirname(os.path.abspath(manifest))
        with open(manifest) as f:
            self.items = [json.loads(line) for line in f if line.strip()]
        if not self.items:
            raise ValueError(f"manifest {manifest} has no samples")
        for item in self.items:
            item["image"] = os.path.join(root, item["image"])
        self.patch, self.max_side = patch, max_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index % len(self.items)]
        with Image.open(item["image"]) as img:
            scale = min(1.0, self.max_side / max(img.size))
            w, h = (max(self.patch, int(s * scale) // self.patch * self.patch) for s in img.size)
            return Sample(to_tensor(img.convert("RGB").resize((w, h), Image.BILINEAR)), item["text"])  # type: ignore[attr-defined]


# ---------------------------------------------------------------- packing

@dataclass
class Batch:
    """Packed samples: one rank's own samples of a micro-batch (or, in one process, all of them)."""
    tokens: torch.Tensor        # [T] int64
    targets: torch.Tensor       # [T] int64 next token, IGNORE where there is no loss
    positions: torch.Tensor     # [T] position of each row within its sample
    seq_lens: list[int]         # tokens per sample
    patches: torch.Tensor       # [N, 3 * patch * patch] pixels, image after image
    patch_grid: torch.Tensor    # [N, 2] (row, col) of each patch in its image
    patch_counts: list[int]     # patches per image


def patchify(image: torch.Tensor, patch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[3, H, W] -> patches [H/p * W/p, 3*p*p] in row-major order, and their (row, col)."""
    c, h, w = image.shape
    gh, gw = h // patch, w // patch
    x = image[:, :gh * patch, :gw * patch].reshape(c, gh, patch, gw, patch)
    x = x.permute(1, 3, 0, 2, 4).reshape(gh * gw, c * patch * patch)
    grid = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    return x, grid.reshape(-1, 2)


def prompt(num_patches: int) -> list[int]:
    """The tokens before a caption: BOS and one IMG token per patch."""
    return [BOS] + [IMG] * num_patches


def pack(samples: list[Sample], patch: int, max_text: int = 64) -> Batch:
    tokens: Any  # the token ids as a list, then as a tensor
    positions: list[int]
    tokens, positions, seq_lens, patches, grids, counts = [], [], [], [], [], []
    for sample in samples:
        p, g = patchify(sample.image, patch)
        seq = prompt(len(p)) + encode(sample.text)[:max_text] + [EOS]
        tokens += seq
        positions += range(len(seq))
        seq_lens.append(len(seq))
        patches.append(p)
        grids.append(g)
        counts.append(len(p))
    tokens = torch.tensor(tokens, dtype=torch.int64)
    targets = torch.full_like(tokens, IGNORE)
    targets[:-1] = tokens[1:]
    if seq_lens:
        targets[torch.tensor(seq_lens).cumsum(0) - 1] = IGNORE  # no prediction across samples
    targets[targets == IMG] = IGNORE  # image tokens are inputs, never predicted
    width = 3 * patch * patch
    return Batch(tokens, targets, torch.tensor(positions, dtype=torch.int64), seq_lens,
                 torch.cat(patches) if patches else torch.zeros(0, width),
                 torch.cat(grids) if grids else torch.zeros(0, 2, dtype=torch.int64), counts)


def step_indices(dataset: SyntheticDataset | ManifestDataset, step: int, batch_size: int,
                 num_micro: int, seed: int) -> list[list[int]]:
    """Dataset indices of `step`'s batch_size samples, as num_micro micro-batches (tensor_split
    of the sample list). Index arithmetic only: nothing is read. A finite dataset is read in a
    seeded permutation per epoch; the synthetic one is infinite and read in order."""
    indices = torch.arange(step * batch_size, (step + 1) * batch_size)
    if hasattr(dataset, "__len__"):
        n = len(dataset)
        epochs = {int(e): torch.randperm(n, generator=torch.Generator().manual_seed(seed + int(e)))
                  for e in (indices // n).unique()}
        indices = torch.stack([epochs[int(i) // n][int(i) % n] for i in indices])
    return [part.tolist() for part in indices.tensor_split(num_micro)]


def rank_share(parts: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """The samples `rank` reads of each micro-batch: its contiguous tensor_split part of the
    step's samples, cut at the micro-batch boundaries. Contiguous parts make the global order
    (ascending rank, then each rank's own order) the dataset order."""
    n = sum(len(part) for part in parts)
    quotient, remainder = divmod(n, world_size)
    lo = rank * quotient + min(rank, remainder)
    hi = lo + quotient + (rank < remainder)
    out, start = [], 0
    for part in parts:
        out.append(part[max(lo - start, 0):max(hi - start, 0)])
        start += len(part)
    return out
