"""Pseudo-label sets (lib/pseudo): the forms of the writer, the labeller copy, the reader, the stream, the stage."""
from __future__ import annotations

import dataclasses
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from lib.data.classes import IGNORE
from lib.data.streams import DataParams
from lib.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Compose, HorizontalFlip, Normalize, RandomCrop, RandomScale
from lib.errors import ConfigError, DataError
from lib.infer.params import InferenceParams
from lib.io import read_label_png, read_rgb, write_label_png, write_rgb
from lib.models import ModelParams, build_model
from lib.models.artifact import MODEL_FILE, load_model, save_model
from lib.models.output import upsample
from lib.pseudo import writer as pseudo_module
from lib.pseudo.artifact import CODE_KEPT, LABELLER, PseudoLabels, decode_confidence, encode_confidence
from lib.pseudo.stream import SOFT_GRID, PseudoLabelledDataset, pseudo_stream, soft_at, soft_grid
from lib.pseudo.writer import (
    PseudoJob,
    PseudoParams,
    apply_class_thresholds,
    check_ids,
    class_balanced_thresholds,
    class_feature_means,
    class_median_thresholds,
    class_prior,
    confidence_histogram,
    generate_pseudo_labels,
    kept_by_class_threshold,
    median_index,
    pseudo_row,
    replay_prototypes,
)
from stages import pseudo_label as stage

H, W, N_IMAGES, C = 64, 128, 5, 19
DATASET = "tiny"


def write_prepared(root: Path) -> None:
    """A labelled prepared split 'train' (its labels must never reach a pseudo-labelled item)."""
    rng = np.random.default_rng(0)
    prepared = root / "data/prepared" / DATASET
    (prepared / "labels/train").mkdir(parents=True)
    (root / "raw").mkdir()
    rows = []
    for i in range(N_IMAGES):
        sample_id = f"img{i}"
        image = rng.integers(0, 256, (H, W, 3)).astype(np.uint8)
        image[:, : W // 2] //= 3   # some structure, so predictions differ across the image
        write_rgb(root / f"raw/{sample_id}.png", image)
        write_label_png(prepared / f"labels/train/{sample_id}.png", np.full((H, W), 7, np.uint8))
        rows.append([sample_id, "train", f"raw/{sample_id}.png",
                     f"data/prepared/{DATASET}/labels/train/{sample_id}.png", H, W])
    pd.DataFrame(rows, columns=["id", "split", "image", "label", "height", "width"]).to_csv(
        prepared / "index.csv", index=False)
    (prepared / "meta.json").write_text(json.dumps({"class_protocol": "cityscapes19"}))


def save_tiny_model(root: Path, name: str, head: str) -> None:
    torch.manual_seed(0)
    params = ModelParams(arch="deeplabv2", depth=18, bn="batch", aux=False, head=head)
    model = build_model(params, C)
    with torch.no_grad():   # random init gives a near-uniform softmax; sharpen it so classes win clearly
        for p in (model.head.classifier.parameters() if head == "cpsl" else model.head.parameters()):
            p.mul_(30.0)
    meta = {"kind": "model", "stage": "train@warmup", "method": "source_only", "model": dataclasses.asdict(params),
            "num_classes": C, "class_set": "cityscapes19", "source": "x", "source_protocol": "cityscapes19",
            "normalize": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}}
    save_model(root / "data/models" / name, model, meta)


SOFT = PseudoParams(batch_size=2, workers=0, min_pixels=3, passes=3, count_cap=4)
HARD = PseudoParams(batch_size=1, workers=0, threshold=0.5)
MEDIAN = PseudoParams(batch_size=1, workers=0, median_cap=0.9)
BALANCED = PseudoParams(batch_size=1, workers=0, threshold=0.6, class_portion=0.3)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder (the module runs inside it) with a prepared split, two tiny models and the
    three artifacts generated once."""
    root = tmp_path_factory.mktemp("project")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        # the comparisons below recompute the predictions on the CPU
        mp.setattr(pseudo_module, "select_device", lambda: torch.device("cpu"))
        write_prepared(root)
        save_tiny_model(root, "cpsl", "cpsl")
        save_tiny_model(root, "aspp", "aspp_sum")
        for name, form, params in (("soft", "soft", SOFT), ("hard", "hard_threshold", HARD),
                                   ("median", "class_median", MEDIAN),
                                   ("balanced", "class_balanced", BALANCED)):
            generate_pseudo_labels(Path("data/models/cpsl"), DATASET, "train", form, params,
                                   Path("data/pseudo") / name, metrics=Path("metrics/pseudo") / name,
                                   progress=False)
        yield root


def normalised_images(root: Path) -> list[torch.Tensor]:
    norm = Normalize(IMAGENET_MEAN, IMAGENET_STD)
    return [norm({"image": read_rgb(root / f"raw/img{i}.png")}, None)["image"][None] for i in range(N_IMAGES)]


def manual_softmax(model, x: torch.Tensor, flip: bool) -> torch.Tensor:
    """softmax(up(logits)), averaged with the mirrored view's softmax: CPSL's
    (Li et al., CVPR 2022) hard pseudo-labels written out."""
    with torch.no_grad():
        p = torch.softmax(upsample(model(x).logits.float(), (H, W)), 1)
        if flip:
            q = torch.softmax(upsample(model(x.flip(-1)).logits.float(), (H, W)), 1).flip(-1)
            p = 0.5 * (p + q)
    return p


# ------------------------------------------------------------------------------------------------
# soft (CPSL P1)


def test_soft_artifact_files(project):
    art = project / "data/pseudo/soft"
    meta = json.loads((art / "meta.json").read_text())
    index = pd.read_csv(art / "index.csv", dtype={"id": str})
    assert list(index["id"]) == [f"img{i}" for i in range(N_IMAGES)]
    soft = np.load(art / index["soft"][0])
    assert soft.dtype == np.float16 and soft.shape[0] == C and soft.ndim == 3
    assert meta["stride"] == 8 and soft.shape[1:] == (9, 17)   # 64x128 through ceil-mode pooling
    np.testing.assert_allclose(soft.astype(np.float32).sum(0), 1.0, atol=5e-3)
    assert np.load(art / "prototypes.npy").dtype == np.float32
    assert np.load(art / "prototypes.npy").shape == (C, 256)
    prior = np.load(art / "prior.npy")
    assert prior.dtype == np.float32 and prior.shape == (C,) and abs(prior.sum() - 1) < 1e-6
    assert meta["form"] == "soft" and meta["model"] == "cpsl" and meta["model_stage"] == "train@warmup"
    assert meta["count"] == N_IMAGES and meta["threshold"]["load_time"] is None


def assert_labeller_is(art: PseudoLabels, model_dir: Path) -> None:
    """The set carries a copy of the model that labelled it (a distillation round's teacher)."""
    assert art.labeller == art.path / LABELLER and art.labeller.is_dir()
    assert sorted(p.name for p in art.labeller.iterdir()) == sorted([MODEL_FILE, "meta.json"])
    for part in (MODEL_FILE, "meta.json"):
        assert (art.labeller / part).read_bytes() == (model_dir / part).read_bytes(), part
    copy, copy_meta = load_model(art.labeller)
    model, meta = load_model(model_dir)
    assert copy_meta == meta
    state = model.state_dict()
    assert all(torch.equal(value, state[key]) for key, value in copy.state_dict().items())
    assert copy.state_dict().keys() == state.keys()


@pytest.mark.parametrize("name", ["soft", "hard", "median", "balanced"])
def test_every_set_carries_its_labeller(project, name):
    assert_labeller_is(PseudoLabels.load(project / "data/pseudo" / name), project / "data/models/cpsl")


def test_soft_prototypes_and_prior_equal_a_direct_forward(project):
    """Prototypes: the running means of CPSL (Li et al., CVPR 2022, after ProDA) over per-image
    class means of the embedding, replayed ``passes`` times; prior: the argmax counts on the logit
    grid, normalised."""
    model, _ = load_model(project / "data/models/cpsl")
    observations, counts = [], np.zeros(C, np.int64)
    for x in normalised_images(project):
        with torch.no_grad():
            out = model(x)
        pred = out.logits.argmax(1)[0].numpy()
        emb = out.features["embedding"][0].double().numpy()
        counts += np.bincount(pred.ravel(), minlength=C)
        for k in range(C):
            if (pred == k).sum() >= SOFT.min_pixels:
                observations.append((k, emb[:, pred == k].mean(1)))
    eta, n = np.zeros((C, 256)), np.zeros(C, np.int64)
    for _ in range(SOFT.passes):
        for k, v in observations:
            eta[k] = (n[k] * eta[k] + v) / (n[k] + 1)
            n[k] = min(n[k] + 1, SOFT.count_cap)
    art = PseudoLabels.load(project / "data/pseudo/soft")
    assert len({k for k, _ in observations}) >= 2   # the check below compares more than one class
    np.testing.assert_allclose(art.prototypes.numpy(), eta, rtol=1e-4, atol=1e-6)
    assert art.meta["prototype_counts"] == n.tolist()
    np.testing.assert_allclose(art.prior.numpy(), counts / counts.sum(), rtol=1e-6)
    assert art.meta["predicted_pixels"] == counts.tolist()
    assert art.meta["kept_fraction"] == [1.0 if c else 0.0 for c in counts]


def test_class_feature_means_keep_classes_with_enough_pixels():
    embedding = torch.zeros(1, 2, 4, 5)
    embedding[0, 0] = torch.arange(20.0).reshape(4, 5)
    embedding[0, 1] = 1.0
    pred = torch.zeros(1, 4, 5, dtype=torch.long)
    pred[0, 0, :] = 2           # 5 pixels of class 2: values 0..4
    pred[0, 3, 1:] = 1          # 4 pixels of class 1: below min_pixels 5
    (observations,) = class_feature_means(embedding, pred, 3, min_pixels=5)
    assert [k for k, _ in observations] == [0, 2]
    class0 = [v for v in range(20) if not (v < 5 or v >= 16)]
    np.testing.assert_allclose(observations[0][1], [np.mean(class0), 1.0])
    np.testing.assert_allclose(observations[1][1], [2.0, 1.0])
    assert observations[0][1].dtype == np.float64


def test_soft_form_on_the_aspp_model_clusters_layer4(project, tmp_path):
    """Under ASPP sum the embedding is layer4 (512-d on a ResNet-18): the soft form works on it."""
    out = tmp_path / "soft_aspp"
    generate_pseudo_labels(Path("data/models/aspp"), DATASET, "train", "soft", SOFT, out, progress=False)
    assert PseudoLabels.load(out).prototypes.shape == (C, 512)
    assert_labeller_is(PseudoLabels.load(out), project / "data/models/aspp")


def test_replay_prototypes_hand_values():
    observations = [(0, np.array([1.0, 0.0])), (0, np.array([3.0, 0.0])), (1, np.array([2.0, 2.0]))]
    eta, n = replay_prototypes(observations, 3, 2, passes=2, count_cap=2)
    # pass 1: eta0 = 1, then (1*1 + 3)/2 = 2 (n0 = 2); eta1 = (2, 2).  pass 2 (n0 capped at 2):
    # (2*2 + 1)/3 = 5/3, then (2*5/3 + 3)/3 = 19/9; eta1 = (1*(2,2) + (2,2))/2 = (2, 2)
    np.testing.assert_allclose(eta, [[19 / 9, 0.0], [2.0, 2.0], [0.0, 0.0]])
    assert n.tolist() == [2, 2, 0]


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(-10, 10), min_size=1, max_size=20))
def test_replay_without_cap_is_the_plain_mean(values):
    observations = [(0, np.array([v])) for v in values]
    eta, n = replay_prototypes(observations, 1, 1, passes=1, count_cap=10_000)
    assert eta[0, 0] == pytest.approx(np.mean(values), abs=1e-9) and n[0] == len(values)


def test_class_prior_normalises_counts():
    prior = class_prior(np.array([3, 1, 0]))
    assert prior.dtype == np.float32 and prior.tolist() == [0.75, 0.25, 0.0]


# ------------------------------------------------------------------------------------------------
# hard_threshold (CPSL P2/P3)


def full_precision_hard(project) -> list[tuple[np.ndarray, np.ndarray]]:
    """(label, float32 confidence) of each image: the flip-averaged softmax written out."""
    model, _ = load_model(project / "data/models/cpsl")
    out = []
    for x in normalised_images(project):
        conf, label = manual_softmax(model, x, flip=True)[0].max(0)
        out.append((label.numpy().astype(np.uint8), conf.numpy()))
    return out


def test_hard_threshold_is_the_flip_averaged_softmax(project):
    model, _ = load_model(project / "data/models/cpsl")
    art = PseudoLabels.load(project / "data/pseudo/hard")
    assert art.meta["flip"] is True
    flip_matters = False
    for i, (x, (label, conf)) in enumerate(zip(normalised_images(project), full_precision_hard(project))):
        stored_label = read_label_png(project / f"data/pseudo/hard/labels/img{i}.png")
        code = read_label_png(project / f"data/pseudo/hard/conf/img{i}.png")
        assert code.dtype == np.uint8 and code.shape == (H, W)
        np.testing.assert_array_equal(stored_label, label)
        np.testing.assert_array_equal(code >= CODE_KEPT, conf.astype(np.float64) > HARD.threshold)
        step = np.where(conf > HARD.threshold, (1 - HARD.threshold) / 128, HARD.threshold / 127)
        assert (np.abs(decode_confidence(code, HARD.threshold) - conf) <= step + 1e-6).all()
        plain = manual_softmax(model, x, flip=False)[0].max(0).values.numpy()
        flip_matters |= bool(np.abs(plain - conf).max() > 1e-2)
    assert flip_matters


def test_a_hard_set_with_float16_confidence_files_asks_for_its_stage_to_rerun(project, tmp_path):
    stale = tmp_path / "hard"
    shutil.copytree(project / "data/pseudo/hard", stale)
    index = pd.read_csv(stale / "index.csv", dtype={"id": str})
    index["conf"] = index["conf"].str.replace(".png", ".npy")
    index.to_csv(stale / "index.csv", index=False)
    with pytest.raises(DataError, match=r"index\.csv: confidence stored as 'conf/img0\.npy', not the 8-bit code "
                                        r"\(conf/<id>\.png\).*dvc repro -f pseudo_label@hard"):
        PseudoLabels.load(stale)


def test_load_time_threshold_sets_low_confidence_to_ignore(project):
    art = PseudoLabels.load(project / "data/pseudo/hard")
    label, conf = full_precision_hard(project)[1]
    thresholded = art.sample("img1", HARD.threshold)["pseudo"]
    np.testing.assert_array_equal(thresholded, np.where(conf.astype(np.float64) > HARD.threshold, label, IGNORE))
    assert (thresholded == IGNORE).any() and (thresholded != IGNORE).any()
    np.testing.assert_array_equal(art.sample("img1", None)["pseudo"], label)
    assert art.default_threshold == 0.5 and "soft" not in art.sample("img1")
    with pytest.raises(ConfigError, match=r"stored exactly at the threshold it was written for \(0\.5\), not at the "
                                          r"load-time pseudo_threshold 0\.95; set pseudo_labels\.hard\.options\.threshold"):
        art.sample("img1", 0.95)


@pytest.mark.parametrize("threshold", [0.95, 0.5, 0.9, 0.968, 0.0])
def test_stored_confidence_keeps_exactly_the_full_precision_pixels(threshold):
    """Constructed confidences on both sides of t by one float32 step, t itself, 0 and 1, and random
    values: the stored code keeps exactly the pixels conf > t keeps (a float16 map does not: it rounds
    values within its step of t across it)."""
    t32 = np.float32(threshold)
    near = [np.nextafter(t32, np.float32(0)), t32, np.nextafter(t32, np.float32(1)), np.float32(threshold + 1e-5),
            np.float32(threshold - 1e-5), np.float32(threshold + 2.4e-4), np.float32(threshold - 2.4e-4)]
    rng = np.random.default_rng(0)
    conf = np.concatenate([np.array([0.0, 1.0, *near], np.float32), rng.random(3991, dtype=np.float32),
                           (threshold + (rng.random(4000) - 0.5) * 1e-3).clip(0, 1).astype(np.float32)]).reshape(80, -1)
    code = encode_confidence(conf, threshold)
    full = conf.astype(np.float64) > threshold
    np.testing.assert_array_equal(code >= CODE_KEPT, full)
    np.testing.assert_array_equal(decode_confidence(code, threshold).astype(np.float64) > threshold, full)
    assert np.abs(decode_confidence(code, threshold) - conf).max() <= max(threshold / 127, (1 - threshold) / 128) + 1e-6
    if threshold in (0.95, 0.968):
        assert ((conf.astype(np.float16).astype(np.float64) > threshold) != full).any()


def test_every_code_decodes_on_its_side_of_the_threshold():
    """Code 127 decodes to t itself, which float32 rounds above t for about half of all thresholds:
    the decoder steps such values back so that every code keeps its side, at any t."""
    codes = np.arange(256, dtype=np.uint8)
    for threshold in [*np.random.default_rng(1).uniform(0, 1, 2000).tolist(), 0.95, 0.968, 1 - 1e-9, 1e-9]:
        decoded = decode_confidence(codes, threshold).astype(np.float64)
        np.testing.assert_array_equal(decoded > threshold, codes >= CODE_KEPT, err_msg=str(threshold))
        assert (np.diff(decoded) >= 0).all()


def test_hard_threshold_kept_fractions_in_meta_and_metrics(project):
    art = PseudoLabels.load(project / "data/pseudo/hard")
    predicted, kept = np.zeros(C), np.zeros(C)
    for label, conf in full_precision_hard(project):
        predicted += np.bincount(label.ravel(), minlength=C)
        kept += np.bincount(label[conf.astype(np.float64) > HARD.threshold], minlength=C)
    expected = np.divide(kept, predicted, out=np.zeros(C), where=predicted > 0)
    np.testing.assert_allclose(art.meta["kept_fraction"], expected)
    np.testing.assert_allclose(art.meta["predicted_fraction"], predicted / predicted.sum())
    assert 0 < art.meta["kept_fraction_total"] < 1
    assert art.meta["kept_fraction_total"] == pytest.approx(kept.sum() / predicted.sum())
    table = pd.read_csv(project / "metrics/pseudo/hard/classes.csv")
    assert list(table.columns) == ["class", "predicted", "kept"] and table["class"][0] == "road"
    np.testing.assert_allclose(table["kept"], expected, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# class_median (BAFFT / SIM)


def reference_thresholds(labels: np.ndarray, conf16: np.ndarray, num_classes: int, cap: float) -> list[float]:
    """SIM written out: sort the class's confidences, take index round(0.5 N), cap, 0 if absent."""
    taus = []
    for c in range(num_classes):
        values = np.sort(conf16[labels == c].astype(np.float64))
        taus.append(0.0 if len(values) == 0 else min(values[int(np.round(0.5 * len(values)))], cap))
    return taus


def test_median_index_follows_sim():
    assert [median_index(n) for n in (1, 2, 3, 4, 5, 6, 7)] == [0, 1, 2, 2, 2, 3, 4]


def test_class_median_thresholds_on_a_constructed_distribution():
    values = {0: [0.1, 0.5, 0.7],                      # N = 3: index round(1.5) = 2 -> 0.7
              1: [0.99, 0.2, 0.95, 0.3, 0.97, 0.4],    # N = 6: index 3 of the sorted -> 0.95, capped 0.9
              3: [0.25, 0.5, 0.125, 1.0, 0.75]}        # N = 5: round(2.5) = 2 (half to even) -> 0.5
    labels = np.concatenate([np.full(len(v), c) for c, v in values.items()])
    conf = np.concatenate([v for v in values.values()]).astype(np.float16)
    taus = class_median_thresholds(confidence_histogram(labels, conf, 4), cap=0.9)
    assert taus.tolist() == [float(np.float16(0.7)), 0.9, 0.0, 0.5]   # class 2 never predicted


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 1.0, width=16)), min_size=1, max_size=60),
       st.floats(0.05, 1.0))
def test_class_median_thresholds_equal_the_sorted_reference(pixels, cap):
    labels = np.array([c for c, _ in pixels])
    conf = np.array([v for _, v in pixels], np.float16)
    taus = class_median_thresholds(confidence_histogram(labels, conf, 3), cap)
    assert taus.tolist() == reference_thresholds(labels, conf, 3, cap)


def test_class_median_artifact(project):
    model, _ = load_model(project / "data/models/cpsl")
    labels, confs = [], []
    for x in normalised_images(project):
        conf, label = manual_softmax(model, x, flip=False)[0].max(0)   # SIM: no flip
        labels.append(label.numpy())
        confs.append(conf.half().numpy())
    labels, confs = np.stack(labels), np.stack(confs)
    taus = reference_thresholds(labels, confs, C, MEDIAN.median_cap)
    art = PseudoLabels.load(project / "data/pseudo/median")
    assert art.meta["flip"] is False and art.default_threshold is None
    assert not (art.path / "conf").exists() and "conf" not in art.index.columns    # the labels carry tau_c
    assert art.meta["thresholds"] == taus
    assert any(t == 0.0 for t in taus) and any(0 < t < MEDIAN.median_cap for t in taus)
    kept = np.zeros(C)
    for i in range(N_IMAGES):
        keep = confs[i].astype(np.float64) >= np.asarray(taus)[labels[i]]
        np.testing.assert_array_equal(art.sample(f"img{i}")["pseudo"], np.where(keep, labels[i], IGNORE))
        kept += np.bincount(labels[i][keep], minlength=C)
    predicted = np.bincount(labels.ravel(), minlength=C)
    assert art.meta["predicted_pixels"] == predicted.tolist() and art.meta["kept_pixels"] == kept.tolist()
    np.testing.assert_allclose(art.meta["kept_fraction"],
                               np.divide(kept, predicted, out=np.zeros(C), where=predicted > 0))


# class_balanced (CBST selection on CPSL's flip-averaged labels; our addition)


def reference_balanced(labels: np.ndarray, conf16: np.ndarray, num_classes: int, portion: float,
                       cap: float) -> list[float]:
    """Written out: sort the class's confidences, take index round((1 - p) N) (at most N - 1), cap."""
    taus = []
    for c in range(num_classes):
        values = np.sort(conf16[labels == c].astype(np.float64))
        n = len(values)
        taus.append(0.0 if n == 0 else min(values[min(int(np.round((1 - portion) * n)), n - 1)], cap))
    return taus


def test_class_balanced_thresholds_on_a_constructed_distribution():
    values = {0: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.99],   # top 20 %: index 8 -> 0.9, capped 0.8
              1: [0.25, 0.5, 0.125, 0.375, 0.0625],                       # index round(4) = 4 -> 0.5
              2: [0.3]}                                                     # one pixel: index 0 -> kept
    labels = np.concatenate([np.full(len(v), c) for c, v in values.items()])
    conf = np.concatenate([v for v in values.values()]).astype(np.float16)
    taus = class_balanced_thresholds(confidence_histogram(labels, conf, 4), portion=0.2, cap=0.8)
    assert taus.tolist() == [0.8, 0.5, float(np.float16(0.3)), 0.0]
    kept = kept_by_class_threshold(labels, conf, taus)
    assert [int(kept[labels == c].sum()) for c in range(3)] == [2, 1, 1]   # float16(0.8) = 0.7998 < the cap 0.8


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0.0, 1.0, width=16)), min_size=1, max_size=60),
       st.floats(0.05, 1.0), st.floats(0.05, 1.0))
def test_class_balanced_thresholds_equal_the_sorted_reference(pixels, portion, cap):
    labels = np.array([c for c, _ in pixels])
    conf = np.array([v for _, v in pixels], np.float16)
    taus = class_balanced_thresholds(confidence_histogram(labels, conf, 3), portion, cap)
    assert taus.tolist() == reference_balanced(labels, conf, 3, portion, cap)
    assert class_balanced_thresholds(confidence_histogram(labels, conf, 3), 0.5, cap).tolist() == \
        class_median_thresholds(confidence_histogram(labels, conf, 3), cap).tolist()   # p 0.5 = SIM's median


def test_class_balanced_artifact_keeps_every_predicted_class(project):
    model, _ = load_model(project / "data/models/cpsl")
    labels, confs = [], []
    for x in normalised_images(project):
        conf, label = manual_softmax(model, x, flip=True)[0].max(0)    # flip-averaged, as CPSL P2/P3
        labels.append(label.numpy())
        confs.append(conf.half().numpy())
    labels, confs = np.stack(labels), np.stack(confs)
    taus = reference_balanced(labels, confs, C, BALANCED.class_portion, BALANCED.threshold)
    art = PseudoLabels.load(project / "data/pseudo/balanced")
    assert art.meta["flip"] is True and art.default_threshold is None
    assert art.meta["thresholds"] == taus
    predicted = np.bincount(labels.ravel(), minlength=C)
    kept = np.zeros(C)
    for i in range(N_IMAGES):
        keep = confs[i].astype(np.float64) >= np.asarray(taus)[labels[i]]
        np.testing.assert_array_equal(art.sample(f"img{i}")["pseudo"], np.where(keep, labels[i], IGNORE))
        kept += np.bincount(labels[i][keep], minlength=C)
    assert art.meta["kept_pixels"] == kept.tolist()
    assert all(kept[c] > 0 for c in range(C) if predicted[c] > 0)     # no predicted class is dropped
    global_kept = np.bincount(labels[confs.astype(np.float64) > BALANCED.threshold], minlength=C)
    assert (kept >= global_kept).all()                                 # the cap: never fewer than the global rule


def test_a_load_time_threshold_on_class_thresholded_labels_is_refused(project):
    with pytest.raises(ConfigError, match="thresholded per class when written"):
        pseudo_stream(DATASET, PseudoLabels.load(project / "data/pseudo/balanced"), 0.95, DataParams(), "imagenet", 0)


def test_class_thresholds_pass_reads_one_file_at_a_time(tmp_path, monkeypatch):
    (tmp_path / "labels").mkdir()
    (tmp_path / "conf").mkdir()
    for sample_id, label, conf in (("a", [[0, 1]], [[0.2, 0.9]]), ("b", [[1, 1]], [[0.5, 0.4]])):
        write_label_png(tmp_path / f"labels/{sample_id}.png", np.array(label, np.uint8))
        np.save(tmp_path / f"conf/{sample_id}.npy", np.array(conf, np.float16))
    reads = []
    original = pseudo_module.read_confidence
    monkeypatch.setattr(pseudo_module, "read_confidence", lambda path: reads.append(path.name) or original(path))
    kept = apply_class_thresholds(tmp_path, ["a", "b"], np.array([0.3, 0.5]), 2)
    assert reads == ["a.npy", "b.npy"]
    assert read_label_png(tmp_path / "labels/a.png").tolist() == [[IGNORE, 1]]
    assert read_label_png(tmp_path / "labels/b.png").tolist() == [[1, IGNORE]]   # 0.5 >= 0.5 kept
    assert kept.tolist() == [0, 2]


# ------------------------------------------------------------------------------------------------
# reader, datasets, stream


def test_soft_sample_is_upsampled_and_its_pseudo_is_the_argmax(project):
    art = PseudoLabels.load(project / "data/pseudo/soft")
    item = art.sample("img2")
    stored = np.load(project / "data/pseudo/soft/soft/img2.npy").astype(np.float32)
    assert item["soft"].shape == (H, W, C) and item["soft"].dtype == np.float32
    np.testing.assert_allclose(item["soft"][0, 0], stored[:, 0, 0])      # align_corners: corners kept
    np.testing.assert_allclose(item["soft"][-1, -1], stored[:, -1, -1])
    np.testing.assert_array_equal(item["pseudo"], item["soft"].argmax(-1))
    assert item["pseudo"].dtype == np.uint8


def test_reader_errors_name_the_file(project, tmp_path):
    with pytest.raises(DataError, match="pseudo-label artifact not found"):
        PseudoLabels.load(tmp_path / "nothing")
    art = PseudoLabels.load(project / "data/pseudo/hard")
    with pytest.raises(DataError, match="no pseudo-label for sample 'ghost'"):
        art.sample("ghost")
    copy = tmp_path / "hard"
    shutil.copytree(project / "data/pseudo/hard", copy)
    (copy / "conf/img0.png").unlink()
    (copy / "conf/img1.png").write_bytes(b"not a png")
    broken = PseudoLabels.load(copy)
    with pytest.raises(DataError, match=r"conf/img0\.png: confidence map not found"):
        broken.sample("img0", HARD.threshold)
    with pytest.raises(DataError, match=r"conf/img1\.png: not a readable confidence map"):
        broken.sample("img1", HARD.threshold)
    soft = tmp_path / "soft"
    shutil.copytree(project / "data/pseudo/soft", soft)
    (soft / "prototypes.npy").unlink()
    with pytest.raises(DataError, match=r"prototypes\.npy: prototype matrix not found"):
        PseudoLabels.load(soft)


def test_pseudo_labelled_dataset_never_returns_the_ground_truth(project):
    art = PseudoLabels.load(project / "data/pseudo/soft")
    dataset = PseudoLabelledDataset(project / "data/prepared" / DATASET, "train", Normalize(), 0, art)
    raw = dataset.load(0)
    assert set(raw) == {"id", "image", "soft", SOFT_GRID}
    item = dataset[0]
    assert "label" not in item and "pseudo" not in item
    stored = np.load(project / "data/pseudo/soft/soft/img0.npy")
    assert item["soft"].dtype == torch.float16 and torch.equal(item["soft"], torch.from_numpy(stored))
    assert item[SOFT_GRID].shape == (2, H, W) and item[SOFT_GRID].dtype == torch.float32
    hard = PseudoLabels.load(project / "data/pseudo/hard")
    thresholded = PseudoLabelledDataset(project / "data/prepared" / DATASET, "train", Normalize(), 0, hard,
                                        threshold=0.5)[1]
    assert "label" not in thresholded and "soft" not in thresholded
    np.testing.assert_array_equal(thresholded["pseudo"].numpy(), hard.sample("img1", 0.5)["pseudo"])
    with pytest.raises(ConfigError, match="soft pseudo-labels are probabilities.*set it to null"):
        PseudoLabelledDataset(project / "data/prepared" / DATASET, "train", Normalize(), 0, art, threshold=0.9)


def full_size_soft_dataset(project, transforms, seed):
    """The soft maps upsampled to the image before the transforms, as a float map that moves with the
    image: the reference the stored-size path must reproduce."""
    art = PseudoLabels.load(project / "data/pseudo/soft")

    class FullSize(PseudoLabelledDataset):
        def load(self, i):
            sample = super(PseudoLabelledDataset, self).load(i)
            return {**sample, "soft": self.pseudo.sample(sample["id"])["soft"]}
    return FullSize(project / "data/prepared" / DATASET, "train", transforms, seed, art)


@pytest.mark.parametrize("crop", [(33, 49), (81, 161)])      # inside the image, and padded beyond it
def test_a_soft_label_read_at_its_stored_size_is_the_full_size_map_cropped_and_flipped(project, crop):
    transforms = Compose([RandomCrop(*crop), HorizontalFlip(1.0), Normalize()])
    art = PseudoLabels.load(project / "data/pseudo/soft")
    stored = PseudoLabelledDataset(project / "data/prepared" / DATASET, "train", transforms, 0, art)
    full = full_size_soft_dataset(project, transforms, 0)
    for i in range(N_IMAGES):
        ours, reference = stored[i], full[i]
        torch.testing.assert_close(ours["image"], reference["image"])          # the same crop drawn
        read = soft_at(ours["soft"][None], ours[SOFT_GRID][None], crop)[0]
        torch.testing.assert_close(read, reference["soft"], atol=2e-6, rtol=0)
        assert read.shape == (C, *crop)
    # at the loss's quarter size (align_corners: every 4th pixel of these crops) the same values
    quarter = ((crop[0] - 1) // 4 + 1, (crop[1] - 1) // 4 + 1)
    torch.testing.assert_close(soft_at(ours["soft"][None], ours[SOFT_GRID][None], quarter)[0],
                               reference["soft"][:, ::4, ::4], atol=2e-6, rtol=0)


def test_a_rescaled_soft_label_is_a_distribution_inside_the_image(project):
    """Under a rescale the stored map is interpolated once (the full-size map would be twice): the
    result stays a probability map inside the image and zero on the padding."""
    transforms = Compose([RandomScale(0.5, 1.5), RandomCrop(80, 160), Normalize()])
    art = PseudoLabels.load(project / "data/pseudo/soft")
    stored = PseudoLabelledDataset(project / "data/prepared" / DATASET, "train", transforms, 3, art)
    full = full_size_soft_dataset(project, transforms, 3)
    item, reference = stored[2], full[2]
    torch.testing.assert_close(item["image"], reference["image"])
    read = soft_at(item["soft"][None], item[SOFT_GRID][None], (80, 160))[0]
    inside = reference["soft"].sum(0) > 0.5
    assert 0 < inside.sum() < inside.numel()                                   # some padding
    torch.testing.assert_close(read.sum(0)[inside], torch.ones(int(inside.sum())), atol=5e-3, rtol=0)
    assert (read[:, ~inside] == 0).all()
    assert (read - reference["soft"]).abs()[:, inside].max() < 0.05


def test_soft_grids_of_images_of_several_sizes_read_their_own_map():
    """A split whose stored maps differ in size pads them to the largest: the grid of each image
    still reads its own cells (a constant map per class reads back everywhere)."""
    small, large = (4, 6), (7, 9)
    maps = torch.zeros(2, 2, *large)
    maps[0, 0, :small[0], :small[1]] = 1.0               # image 0: class 0 on its 4x6 cells, padded
    maps[1, 1] = 1.0                                     # image 1: class 1 on all 7x9 cells
    grids = torch.stack([torch.from_numpy(soft_grid((25, 41), small, large)).permute(2, 0, 1),
                         torch.from_numpy(soft_grid((25, 41), large, large)).permute(2, 0, 1)])
    read = soft_at(maps, grids, (25, 41))
    torch.testing.assert_close(read[0, 0], torch.ones(25, 41))
    torch.testing.assert_close(read[1, 1], torch.ones(25, 41))
    assert read[0, 1].abs().max() == 0 and read[1, 0].abs().max() == 0


def test_pseudo_stream_batches(project):
    art = PseudoLabels.load(project / "data/pseudo/soft")
    data = DataParams(batch_size=2, crop=(32, 48), workers=0)
    batch = next(pseudo_stream(DATASET, art, None, data, "imagenet", seed=3)(0))
    assert set(batch) == {"id", "image", "soft", SOFT_GRID, "draw"}
    assert batch["image"].shape == (2, 3, 32, 48) and batch[SOFT_GRID].shape == (2, 2, 32, 48)
    assert batch["soft"].shape == (2, C, 9, 17) and batch["soft"].dtype == torch.float16   # the stored size
    again = list(islice(pseudo_stream(DATASET, art, None, data, "imagenet", seed=3)(0), 1))[0]
    assert torch.equal(again["soft"], batch["soft"]) and torch.equal(again[SOFT_GRID], batch[SOFT_GRID])
    with pytest.raises(ConfigError, match="sample uniformly"):
        pseudo_stream(DATASET, art, None, dataclasses.replace(data, sampling="rare_class"), "imagenet", 0)
    with pytest.raises(ConfigError, match="cannot label 'other'"):
        pseudo_stream("other", art, None, data, "imagenet", 0)


# ------------------------------------------------------------------------------------------------
# params and up-front checks


def pseudo_params(**rows) -> dict:
    """params.yaml with a two-model table and the ``pseudo_labels`` rows given."""
    return {"source": "s", "target": "d", "models": {"warmup": {"recipe": "source_only", "from": "scratch"}},
            "selftrained": {"stage1": {"recipe": "cpsl_stage1", "from": "warmup", "pseudo": "p1"}},
            "ensembles": {"both": {"models": ["warmup", "stage1"], "weights": [0.5, 0.5]}},
            "pseudo_labels": rows}


def test_pseudo_row_reads_the_row_and_its_options():
    params = pseudo_params(
        p1={"model": "warmup", "form": "soft"},
        p2={"model": "stage1", "form": "hard_threshold",
            "options": {"threshold": 0.9, "batch_size": 4, "inference": {"mode": "whole"}, "split": "val"}},
        p3={"model": "both", "form": "class_balanced", "options": {"flip": False}})
    job, options = pseudo_row(params, "p2")
    # the dataset is the table's target; options.split picks the split (default train)
    assert job == PseudoJob(model="stage1", form="hard_threshold", dataset="d", split="val")
    assert options.threshold == 0.9 and options.batch_size == 4 and options.flip_for("hard_threshold")
    assert options == PseudoParams(threshold=0.9, batch_size=4, inference=InferenceParams(mode="whole"))
    job, options = pseudo_row(params, "p1")
    assert job == PseudoJob(model="warmup", form="soft", dataset="d", split="train")
    assert options == PseudoParams() and not options.flip_for("soft")
    job, options = pseudo_row(params, "p3")          # an ensemble labels too
    assert job.model == "both" and not options.flip_for("class_balanced")
    assert not PseudoParams().flip_for("class_median") and PseudoParams().flip_for("class_balanced")
    with pytest.raises(ConfigError, match="no pseudo-label set 'p4' under pseudo_labels"):
        pseudo_row(params, "p4")
    with pytest.raises(ConfigError, match="is not one of"):
        pseudo_row(pseudo_params(x={"model": "warmup", "form": "median"}), "x")
    with pytest.raises(ConfigError, match="unknown key 'pseudo_labels.x.options.tresh'"):
        pseudo_row(pseudo_params(x={"model": "warmup", "form": "soft", "options": {"tresh": 1}}), "x")
    with pytest.raises(ConfigError, match="unknown key 'pseudo_labels.x.threshold'"):   # options go under options
        pseudo_row(pseudo_params(x={"model": "warmup", "form": "soft", "threshold": 0.9}), "x")
    with pytest.raises(ConfigError, match="inference.flip"):
        pseudo_row(pseudo_params(x={"model": "warmup", "form": "hard_threshold",
                                    "options": {"inference": {"flip": True}}}), "x")
    with pytest.raises(ConfigError, match="pseudo_labels.x.model 'nope' is not a model of the table"):
        pseudo_row(pseudo_params(x={"model": "nope", "form": "soft"}), "x")
    with pytest.raises(ConfigError, match="'target' must name the prepared dataset"):
        pseudo_row({**pseudo_params(x={"model": "warmup", "form": "soft"}), "target": None}, "x")


def test_up_front_checks(project, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="is not one of"):
        generate_pseudo_labels(Path("data/models/cpsl"), DATASET, "train", "median", HARD, out)
    with pytest.raises(ConfigError, match="flip and sliding windows"):
        generate_pseudo_labels(Path("data/models/cpsl"), DATASET, "train", "soft",
                               dataclasses.replace(SOFT, flip=True), out)
    with pytest.raises(DataError, match="data/models/nope: model artifact not found"):
        generate_pseudo_labels(Path("data/models/nope"), DATASET, "train", "soft", SOFT, out)
    with pytest.raises(DataError, match="prepared dataset not found"):
        generate_pseudo_labels(Path("data/models/cpsl"), "nope", "train", "soft", SOFT, out)
    assert not out.exists()
    with pytest.raises(DataError, match="cannot be a file name"):
        check_ids(["a", "b/c"], "index.csv")
    with pytest.raises(DataError, match="appears twice"):
        check_ids(["a", "a"], "index.csv")
    with pytest.raises(ConfigError, match="threshold must be in"):
        PseudoParams(threshold=1.0).validate("pseudo_label")


def test_stage_writes_the_artifact_and_prints_one_line(project, capsys):
    (project / "params.yaml").write_text(yaml.safe_dump({
        "source": "x", "target": DATASET,
        "models": {"aspp": {"recipe": "source_only", "from": "scratch"}},
        "pseudo_labels": {"stage_out": {"model": "aspp", "form": "class_median", "options": {
            "batch_size": 5, "workers": 0, "inference": InferenceParams().__dict__}}}}))
    stage.main(["stage_out"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("wrote data/pseudo/stage_out: 5 images of tiny/train labelled by aspp")
    assert "kept fraction" in line
    assert (project / "metrics/pseudo/stage_out/classes.csv").is_file()
    art = PseudoLabels.load(project / "data/pseudo/stage_out")
    assert art.meta["model"] == "aspp" and art.meta["dataset"] == DATASET and art.meta["split"] == "train"
    assert_labeller_is(art, project / "data/models/aspp")
    with pytest.raises(SystemExit):
        stage.main(["missing"])
    assert "error: params: no pseudo-label set 'missing'" in capsys.readouterr().err
