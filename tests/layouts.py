"""Builders of tiny raw datasets in each real layout, and the label maps of the methods' released code.

The maps here are written out from the released code on purpose, independently of
``lib/data/classes.py``, so that the converter tests check our tables against the originals.
"""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import scipy.io
import torch
from PIL import Image

# Cityscapes (and GTA5) label ID -> train ID (the released code, valeoai/ADVENT, root0yang/BlindNet).
SPEC_LABELID_TO_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
                         24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA raw ID -> 19 train IDs (the released code, root0yang/BlindNet).
SPEC_SYNTHIA_TO_19 = {0: 255, 1: 10, 2: 2, 3: 0, 4: 1, 5: 4, 6: 8, 7: 5, 8: 13, 9: 7, 10: 11, 11: 18,
                      12: 17, 13: 255, 14: 255, 15: 6, 16: 9, 17: 12, 18: 14, 19: 15, 20: 16, 21: 3,
                      22: 255}
# SYNTHIA raw ID -> 16 renumbered train IDs (the released code, valeoai/DADA).
SPEC_SYNTHIA_TO_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11,
                      8: 12, 19: 13, 12: 14, 11: 15}
# The 13-class SYNTHIA ids in train-ID order (the released code, lslrh/CPSL).
SPEC_SYNTHIA_13_ORDER = [3, 4, 2, 15, 9, 6, 1, 10, 17, 8, 19, 12, 11]
# GTAV colour -> train ID (the released code, root0yang/BlindNet).
SPEC_GTAV_COLORS = {(128, 64, 128): 0, (244, 35, 232): 1, (70, 70, 70): 2, (102, 102, 156): 3,
                    (190, 153, 153): 4, (153, 153, 153): 5, (250, 170, 30): 6, (220, 220, 0): 7,
                    (107, 142, 35): 8, (152, 251, 152): 9, (70, 130, 180): 10, (220, 20, 60): 11,
                    (255, 0, 0): 12, (0, 0, 142): 13, (0, 0, 70): 14, (0, 60, 100): 15,
                    (0, 80, 100): 16, (0, 0, 230): 17, (119, 11, 32): 18}
# Mapillary v1.2 ID -> train ID (the released code, root0yang/BlindNet).
SPEC_MAPILLARY = {13: 0, 24: 0, 41: 0, 2: 1, 15: 1, 17: 2, 6: 3, 3: 4, 45: 5, 47: 5, 48: 6, 50: 7,
                  30: 8, 29: 9, 27: 10, 19: 11, 20: 12, 21: 12, 22: 12, 55: 13, 61: 14, 54: 15,
                  58: 16, 57: 17, 52: 18}

H, W = 12, 16


def spec_map(raw: np.ndarray, table: dict[int, int]) -> np.ndarray:
    out = np.full(raw.shape, 255, np.uint8)
    for k, v in table.items():
        out[raw == k] = v
    return out


def raw_ids(rng: np.random.Generator, values: list[int], h: int = H, w: int = W) -> np.ndarray:
    """A label covering every value at least once, then random."""
    flat = rng.choice(values, size=h * w)
    flat[: len(values)] = values
    return flat.reshape(h, w).astype(np.uint8)


def save_rgb(path: Path, rgb: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path, quality=95) if path.suffix == ".jpg" else Image.fromarray(rgb).save(path)
    return path


def random_image(rng, h: int = H, w: int = W) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_gray(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(ids.astype(np.uint8)).save(path)  # mode 'L'
    return path


def save_palette(path: Path, ids: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.frombytes("P", (ids.shape[1], ids.shape[0]), ids.astype(np.uint8).tobytes())
    im.putpalette(np.random.default_rng(0).integers(0, 256, 768).tolist())
    im.save(path)
    return path


def save_png16_rgb(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (as SYNTHIA's GT/LABELS files are)."""
    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    return path


# --- whole layouts: each returns {id: expected train-ID array} -------------------------------

def make_gta5(root: Path, rng, n: int = 3, split_mat: dict | None = None, size: tuple[int, int] = (H, W),
              label_sizes: dict[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Frames 00001.. of ``size``; ``label_sizes`` gives frame i a label of another size (as a few real ones have)."""
    expected = {}
    for i in range(1, n + 1):
        name = f"{i:05d}"
        save_rgb(root / "images" / f"{name}.png", random_image(rng, *size))
        ids = raw_ids(rng, list(range(34)) + [255], *(label_sizes or {}).get(i, size))
        save_palette(root / "labels" / f"{name}.png", ids)
        expected[name] = spec_map(ids, SPEC_LABELID_TO_TRAIN)
    if split_mat is not None:
        scipy.io.savemat(root / "split.mat", {k: np.array(v, np.int32).reshape(-1, 1) for k, v in split_mat.items()})
    return expected


def make_gtav_split(root: Path, rng, per_split: dict[str, int], size: tuple[int, int] = (H, W),
                    label_sizes: dict[int, tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """Frames numbered from 1 across the split folders; ``label_sizes`` gives frame i a label of another size."""
    colors = list(SPEC_GTAV_COLORS) + [(1, 2, 3), (0, 0, 0)]
    expected, frame = {}, 0
    for folder, n in per_split.items():
        for _ in range(n):
            frame += 1
            choice = raw_ids(rng, list(range(len(colors))), *(label_sizes or {}).get(frame, size))
            rgb = np.array(colors, np.uint8)[choice]
            save_rgb(root / "images" / folder / "1" / f"{frame:05d}.png", random_image(rng, *size))
            save_rgb(root / "labels" / folder / "1" / f"{frame:05d}.png", rgb)
            expected[f"{frame:05d}"] = np.array([SPEC_GTAV_COLORS.get(c, 255) for c in colors], np.uint8)[choice]
    return expected


def make_synthia(root: Path, rng, n: int = 10) -> dict[str, np.ndarray]:
    raws = {}
    for i in range(n):
        name = f"{i:07d}"
        save_rgb(root / "RGB" / f"{name}.png", random_image(rng))
        ids = raw_ids(rng, list(range(23))).astype(np.uint16)
        instance = rng.integers(0, 4000, ids.shape).astype(np.uint16)  # channel 1: instance IDs
        save_png16_rgb(root / "GT" / "LABELS" / f"{name}.png", np.stack([ids, instance, np.zeros_like(ids)], -1))
        raws[name] = ids.astype(np.uint8)
    return raws


CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "lindau"), "test": ("berlin",)}


def make_cityscapes(root: Path, rng, per_split: dict[str, int], size: tuple[int, int] = (H, W)) -> dict[str, np.ndarray]:
    expected = {}
    for split, n in per_split.items():
        cities = CITIES[split]
        for i in range(n):
            city = cities[i % len(cities)]
            stem = f"{city}_{i:06d}_{19 + i:06d}"
            save_rgb(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png", random_image(rng, *size))
            ids = raw_ids(rng, list(range(34)), *size)
            save_gray(root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png", ids)
            expected[stem] = spec_map(ids, SPEC_LABELID_TO_TRAIN)
    return expected


def trainid_label(rng, size: tuple[int, int] = (H, W)) -> np.ndarray:
    return raw_ids(rng, list(range(19)) + [255], *size)


def make_acdc_native(root: Path, rng, conditions: dict[str, dict[str, int]],
                     size: tuple[int, int] = (H, W)) -> dict[str, np.ndarray]:
    expected = {}
    for c, (cond, splits) in enumerate(conditions.items()):
        for k, (split, n) in enumerate(splits.items()):
            seq = f"GOPR0{c}{k}{len(cond)}"
            for i in range(n):
                stem = f"{seq}_frame_{i:06d}"
                save_rgb(root / "rgb_anon" / cond / split / seq / f"{stem}_rgb_anon.png", random_image(rng, *size))
                if split != "test":
                    ids = trainid_label(rng, size)
                    save_gray(root / "gt" / cond / split / seq / f"{stem}_gt_labelTrainIds.png", ids)
                    expected[stem] = ids
                else:
                    expected[stem] = None
    return expected


def make_acdc_flat(root: Path, rng, per_split: dict[str, int]) -> dict[str, np.ndarray]:
    expected = {}
    for split, n in per_split.items():
        for i in range(n):
            stem = f"GOPR0{split}{i}_frame_{i:06d}"
            save_rgb(root / "rgb_anon" / split / f"{stem}_rgb_anon.png", random_image(rng))
            ids = trainid_label(rng)
            save_gray(root / "gt" / split / f"{stem}_gt_labelTrainIds.png", ids)
            expected[stem] = ids
    return expected


def make_dark_zurich(root: Path, rng, train: dict[str, int], val: int,
                     size: tuple[int, int] = (H, W)) -> dict[str, np.ndarray | None]:
    expected = {}
    for time, n in train.items():
        for i in range(n):
            stem = f"GOPR0{len(time)}_{time}_frame_{i:06d}"
            save_rgb(root / "rgb_anon" / "train" / time / "GOPR0356" / f"{stem}_rgb_anon.png", random_image(rng, *size))
            expected[stem] = None
    for i in range(val):
        stem = f"GOPR0356_frame_{i:06d}"
        save_rgb(root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png", random_image(rng, *size))
        ids = trainid_label(rng, size)
        save_gray(root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png", ids)
        expected[stem] = ids
    return expected


def make_bdd100k(root: Path, rng, per_split: dict[str, int], suffix: str = "",
                 size: tuple[int, int] = (H, W)) -> dict[str, np.ndarray]:
    expected = {}
    for split, n in per_split.items():
        for i in range(n):
            stem = f"{split[0]}{i:04d}abcd-1234"
            save_rgb(root / "images" / split / f"{stem}.jpg", random_image(rng, *size))
            ids = trainid_label(rng, size)
            save_gray(root / "labels" / split / f"{stem}{suffix}.png", ids)
            expected[stem] = ids
    return expected


def make_mapillary(root: Path, rng, n: int = 3, release: str = "v1.2",
                   sizes: list[tuple[int, int]] | None = None) -> dict[str, np.ndarray]:
    """``n`` images of H x W, or one per (height, width) of ``sizes`` (each at least 66 pixels)."""
    expected = {}
    label_dir = root / "validation" / ("labels" if release == "v1.2" else "v1.2/labels")
    for i, (h, w) in enumerate(sizes or [(H, W)] * n):
        stem = f"mapi{i:03d}XyZ"
        save_rgb(root / "validation" / "images" / f"{stem}.jpg", random_image(rng, h, w))
        ids = raw_ids(rng, list(range(66)), h, w)
        save_palette(label_dir / f"{stem}.png", ids)
        expected[stem] = spec_map(ids, SPEC_MAPILLARY)
    (root / "config.json").write_text("{}")
    return expected


def prepare_gta_and_cityscapes(root: Path, gta5_split_mat: dict | None = None) -> Path:
    """Under ``root``: raw GTA5 (6 frames, optional split.mat) and Cityscapes (train 3) written with
    seed 0, prepared as data/prepared/gta and data/prepared/cs."""
    import contextlib

    from lib.data.convert import PrepareParams, parse_dataset_spec, prepare_dataset
    rng = np.random.default_rng(0)
    with contextlib.chdir(root):
        make_gta5(Path("raw/gta5"), rng, n=6, split_mat=gta5_split_mat)
        make_cityscapes(Path("raw/cs"), rng, {"train": 3})
        params = PrepareParams(workers=1, centroid_tile=1024)
        for name, spec in {"gta": {"layout": "gta5", "root": "raw/gta5"},
                           "cs": {"layout": "cityscapes", "root": "raw/cs", "splits": ["train"]}}.items():
            prepare_dataset(parse_dataset_spec(name, spec), Path("data/prepared") / name, params)
    return root


# --- weights files in the key layouts their authors publish them in ----------------------------

def torchvision_resnet_state(depth: int) -> dict[str, torch.Tensor]:
    """A randomly initialised torchvision ResNet state dict (the layout of resnet<depth>-<hash>.pth)."""
    import torchvision
    return getattr(torchvision.models, f"resnet{depth}")(weights=None).state_dict()


def simclr_state(state: dict[str, torch.Tensor]) -> dict:
    """SimCLRv2's converted r101_1x_sk0.pth: a ``state_dict`` under torchvision's names, with its
    classifier and the projection head's layers beside it."""
    extra = {"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000),
             "projection.0.weight": torch.zeros(2048, 2048), "projection.1.running_mean": torch.zeros(2048)}
    return {"state_dict": {**state, **extra}}


def caffe_reference():
    """A seeded Caffe-layout ResNet-101 backbone (DeepLab's), frozen affine BN, in eval mode."""
    from lib.models.backbone import ResNetBackbone
    torch.manual_seed(2)
    return ResNetBackbone(101, dilations=(2, 4), ceil_pool=True, bn="frozen_affine", style="caffe").eval()


def deeplab_caffe_state(reference) -> dict[str, torch.Tensor]:
    """The layout of DeepLab_resnet_pretrained_init-f81d91e8.pth: `Scale.` before every key, conv1 over
    BGR inputs, no num_batches_tracked, and the checkpoint's own classifier `layer5` (four dilated 3x3
    convs to its 21 classes)."""
    state = {f"Scale.{k}": v.clone() for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["Scale.conv1.weight"] = reference.conv1.weight.detach().flip(1).clone()       # BGR order in the file
    for i in range(4):
        state[f"Scale.layer5.conv2d_list.{i}.weight"] = torch.randn(21, 2048, 3, 3)
        state[f"Scale.layer5.conv2d_list.{i}.bias"] = torch.randn(21)
    return state
