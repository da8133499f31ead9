import numpy as np
import pytest
import torch

from lib.data.transforms import (OUTSIDE, Compose, GaussianBlur, HorizontalFlip, Normalize, PhotometricJitter,
                                 RandomCrop, RandomScale, Resize, pad_to)

# Class c is painted with colour PALETTE[c]; 255 (ignore) is black, like the image padding.
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[:8] = [[200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30],
               [200, 30, 200], [30, 200, 200], [120, 120, 120], [250, 250, 250]]


def painted_sample(seed: int = 0, height: int = 60, width: int = 90, block: int = 6) -> dict:
    """A label of random class blocks and an image painted from it, so alignment is checkable."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 8, (height // block, width // block)).astype(np.uint8)
    label = np.kron(blocks, np.ones((block, block), np.uint8))
    return {"id": "x", "image": PALETTE[label], "label": label}


def test_nearest_geometry_keeps_image_label_and_maps_aligned():
    pipeline = Compose([RandomScale(0.5, 1.6, "nearest"), RandomCrop(48, 80), HorizontalFlip(0.5)])
    for seed in range(20):
        sample = painted_sample(seed)
        sample["pseudo"] = sample["label"].copy()
        before = {k: v.copy() for k, v in sample.items() if isinstance(v, np.ndarray)}
        out = pipeline(sample, np.random.default_rng(seed))
        assert out["image"].shape == (48, 80, 3) and out["label"].shape == (48, 80)
        np.testing.assert_array_equal(out["image"], PALETTE[out["label"]])
        np.testing.assert_array_equal(out["pseudo"], out["label"])
        assert out["id"] == "x"
        for key, value in before.items():  # transforms never mutate their input
            np.testing.assert_array_equal(sample[key], value)


def test_bilinear_image_stays_aligned_with_label_away_from_edges():
    pipeline = Compose([RandomScale(0.7, 1.5), RandomCrop(40, 40), HorizontalFlip(0.5)])
    for seed in range(10):
        out = pipeline(painted_sample(seed, block=10), np.random.default_rng(seed))
        distance = np.abs(out["image"][:, :, None, :].astype(int) - PALETTE[None, None, :8].astype(int))
        nearest_class = distance.sum(-1).argmin(-1)
        assert (nearest_class == out["label"]).mean() > 0.9


def test_resize_scales_float_maps_bilinearly_and_labels_by_nearest():
    sample = {"image": np.zeros((4, 4, 3), np.uint8), "label": np.arange(16, dtype=np.uint8).reshape(4, 4),
              "confidence": np.tile(np.linspace(0, 1, 4, dtype=np.float32), (4, 1))}
    out = Resize(8, 8)(sample, np.random.default_rng(0))
    assert set(np.unique(out["label"])) == set(range(16))
    assert out["confidence"].dtype == np.float32 and len(np.unique(out["confidence"])) > 4


def test_crop_pads_label_with_ignore_and_image_with_zero():
    sample = painted_sample(0, height=12, width=18)
    out = RandomCrop(20, 30)(sample, np.random.default_rng(0))
    assert out["label"].shape == (20, 30)
    padded = out["label"] == 255
    assert padded.sum() == 20 * 30 - 12 * 18
    assert (out["image"][padded] == 0).all()
    np.testing.assert_array_equal(out["label"][4:16, 6:24], sample["label"])  # symmetric padding


def test_centroid_crop_always_contains_the_centroid():
    rng = np.random.default_rng(0)
    centroids = [(0, 0), (99, 199), (0, 199), (99, 0)] + [tuple(rng.integers((100, 200))) for _ in range(40)]
    for i, (cy, cx) in enumerate(centroids):
        label = np.zeros((100, 200), np.uint8)
        label[cy, cx] = 1
        sample = {"image": np.zeros((100, 200, 3), np.uint8), "label": label, "centroid": (cy, cx)}
        out = RandomCrop(30, 40)(sample, np.random.default_rng(i))
        y, x = out["centroid"]
        assert 0 <= y < 30 and 0 <= x < 40
        assert out["label"][y, x] == 1


def test_centroid_survives_scale_and_flip():
    for seed in range(20):
        label = np.zeros((120, 240), np.uint8)
        label[90:96, 200:206] = 5
        sample = {"image": np.zeros((120, 240, 3), np.uint8), "label": label, "centroid": (93, 203)}
        pipeline = Compose([RandomScale(0.5, 2.0), RandomCrop(32, 32), HorizontalFlip(0.5)])
        out = pipeline(sample, np.random.default_rng(seed))
        assert out["label"][out["centroid"]] == 5


def test_rare_class_recrop_reaches_min_pixels_when_possible():
    label = np.zeros((200, 200), np.uint8)
    label[60:140, 60:140] = 3
    base = {"image": np.zeros((200, 200, 3), np.uint8), "label": label}
    crop = RandomCrop(50, 50)

    def success_rate(hinted: bool) -> float:
        hints = {"rare_class": 3, "min_pixels": 1000} if hinted else {}
        counts = [(crop({**base, **hints}, np.random.default_rng(s))["label"] == 3).sum() for s in range(100)]
        return float(np.mean(np.array(counts) > 1000))

    assert success_rate(hinted=False) < 0.5  # one crop often lacks enough of the class ...
    assert success_rate(hinted=True) > 0.9   # ... ten re-draws almost always succeed (1 - 0.7^10)


def test_rare_class_hint_is_ignored_without_label():
    sample = {"image": np.zeros((40, 40, 3), np.uint8), "rare_class": 2, "min_pixels": 10}
    assert RandomCrop(20, 20)(sample, np.random.default_rng(0))["image"].shape == (20, 20, 3)


@pytest.mark.parametrize("transform", [PhotometricJitter(0.4, 0.4, 0.4, 0.1), GaussianBlur(0.5, 2.0)])
def test_photometric_transforms_change_the_image_only(transform):
    sample = painted_sample(1)
    out = transform(sample, np.random.default_rng(3))
    assert out["label"] is sample["label"]
    assert out["image"].dtype == np.uint8 and out["image"].shape == sample["image"].shape
    assert not np.array_equal(out["image"], sample["image"])


def test_brightness_multiplies_every_pixel_by_one_factor():
    image = np.random.default_rng(0).integers(20, 120, (16, 16, 3)).astype(np.uint8)
    out = PhotometricJitter(brightness=0.5)({"image": image}, np.random.default_rng(1))["image"]
    factor = out.astype(float).sum() / image.astype(float).sum()
    assert 0.5 <= factor <= 1.5
    np.testing.assert_allclose(out, np.clip(image * factor, 0, 255), atol=1.0)


def test_saturation_and_hue_leave_a_gray_image_gray():
    gray = np.random.default_rng(0).integers(0, 256, (16, 16, 1)).astype(np.uint8).repeat(3, axis=2)
    for seed in range(5):
        out = PhotometricJitter(saturation=0.8, hue=0.3)({"image": gray}, np.random.default_rng(seed))
        assert np.abs(out["image"].astype(int) - gray).max() <= 1


def test_blur_keeps_a_constant_image():
    image = np.full((20, 20, 3), 77, np.uint8)
    out = GaussianBlur(0.15, 1.3)({"image": image}, np.random.default_rng(0))
    np.testing.assert_array_equal(out["image"], image)


def test_probability_zero_is_identity():
    sample = painted_sample(2)
    rng = np.random.default_rng(0)
    for transform in [PhotometricJitter(0.4, 0.4, 0.4, 0.1, p=0.0), GaussianBlur(0.1, 2.0, p=0.0),
                      HorizontalFlip(0.0)]:
        assert transform(sample, rng) is sample


def test_normalize_values_and_tensor_types():
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    image = np.zeros((2, 3, 3), np.uint8)
    image[0, 0] = 255
    sample = {"image": image, "label": np.full((2, 3), 255, np.uint8),
              "soft": np.ones((2, 3, 4), np.float32), "id": "a"}
    out = Normalize(mean, std)(sample, np.random.default_rng(0))
    assert out["image"].dtype == torch.float32 and out["image"].shape == (3, 2, 3)
    torch.testing.assert_close(out["image"][:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))
    torch.testing.assert_close(out["image"][:, 1, 1], torch.tensor([-1.0, -1.0, 0.0]))
    assert out["label"].dtype == torch.int64 and (out["label"] == 255).all()
    assert out["soft"].dtype == torch.float32 and out["soft"].shape == (4, 2, 3)
    assert out["id"] == "a"


def test_padding_fills_each_kind_of_map_with_what_reads_as_nothing():
    sample = {"image": np.full((2, 3, 3), 9, np.uint8), "label": np.zeros((2, 3), np.uint8),
              "conf": np.ones((2, 3), np.float32), "soft_grid": np.zeros((2, 3, 2), np.float32)}
    out = pad_to(sample, 4, 3)
    assert (out["image"][0] == 0).all() and (out["image"][1:3] == 9).all()
    assert (out["label"][[0, 3]] == 255).all() and (out["conf"][[0, 3]] == 0).all()
    assert (out["soft_grid"][[0, 3]] == OUTSIDE).all() and (out["soft_grid"][1:3] == 0).all()


def test_same_generator_seed_gives_the_same_augmentation():
    pipeline = Compose([RandomScale(0.5, 1.5), RandomCrop(32, 32), HorizontalFlip(),
                        PhotometricJitter(0.4, 0.4, 0.4, 0.1, p=0.5), GaussianBlur(0.15, 1.3, p=0.5)])
    first = pipeline(painted_sample(0), np.random.default_rng([7, 3]))
    again = pipeline(painted_sample(0), np.random.default_rng([7, 3]))
    np.testing.assert_array_equal(first["image"], again["image"])
    np.testing.assert_array_equal(first["label"], again["label"])


def mmseg_cat_max_crop(label: np.ndarray, crop: tuple[int, int], ratio: float, rng) -> tuple[int, int]:
    """mmseg's RandomCrop with cat_max_ratio, written from its description: a crop, then up to ten
    new ones while fewer than two labelled classes are in it or one covers >= ratio of them."""
    h, w = label.shape

    def draw():
        return int(rng.integers(0, h - crop[0] + 1)), int(rng.integers(0, w - crop[1] + 1))

    top, left = draw()
    for _ in range(10):
        window = label[top:top + crop[0], left:left + crop[1]]
        classes, counts = np.unique(window[window != 255], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < ratio:
            break
        top, left = draw()
    return top, left


@pytest.mark.parametrize("seed", range(12))
def test_cat_max_ratio_redraws_crops_one_class_dominates(seed):
    """CISS's source crop (DAFormer's mmseg pipeline, cat_max_ratio 0.75): mostly road, a few objects."""
    rng = np.random.default_rng(100 + seed)
    label = np.zeros((60, 90), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, 50), rng.integers(0, 80)
        label[y:y + 10, x:x + 10] = rng.integers(1, 8)
    label[:5] = 255
    sample = {"id": "x", "image": PALETTE[label], "label": label}
    out = RandomCrop(20, 20, cat_max_ratio=0.75)(sample, np.random.default_rng(seed))
    top, left = mmseg_cat_max_crop(label, (20, 20), 0.75, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["label"], label[top:top + 20, left:left + 20])
    plain = RandomCrop(20, 20)(sample, np.random.default_rng(seed))      # the first draw is the same crop
    reference = np.random.default_rng(seed)
    first = int(reference.integers(0, 41)), int(reference.integers(0, 71))
    np.testing.assert_array_equal(plain["label"], label[first[0]:first[0] + 20, first[1]:first[1] + 20])


def test_rare_class_attempts_are_crops_already_balanced_under_cat_max_ratio():
    """DAFormer's order (CISS sets both): each rare-class attempt is a whole mmseg crop, so the crop
    kept holds the rare class whenever a balanced crop with it was drawn.  Columns 0-3 are the rare
    class 5, two bands of class 1 make other crops balanced, the rest is road (0); of the 8-wide
    crops, starts 0-1 hold the rare class and are balanced, start 2 holds it but is 3/4 road."""
    label = np.zeros((8, 40), np.uint8)
    label[:, :4], label[:, 20:24], label[:, 32:36] = 5, 1, 1
    sample = {"image": PALETTE[label], "label": label, "rare_class": 5, "min_pixels": 8}
    kept = []
    for seed in range(400):
        out = RandomCrop(8, 8, cat_max_ratio=0.75)(sample, np.random.default_rng(seed))
        kept.append(np.count_nonzero(out["label"] == 5) > 8)
    # a balanced draw holds the rare class with p = 2/15, so ten attempts keep it with p = 1 - (13/15)^10
    # = 0.76; cropping for the rare class first and balancing after keeps it with p = 0.44
    assert np.mean(kept) > 0.68


def test_a_one_class_image_keeps_the_eleventh_crop():
    label = np.full((30, 30), 3, np.uint8)
    rng = np.random.default_rng(0)
    RandomCrop(10, 10, cat_max_ratio=0.75)({"image": PALETTE[label], "label": label}, rng)
    reference = np.random.default_rng(0)
    reference.integers(0, 21, size=22)          # eleven crops of two coordinates each
    assert rng.integers(0, 1 << 30) == reference.integers(0, 1 << 30)


def test_bicubic_resizes_the_image_bicubically_and_the_label_by_nearest():
    import cv2

    from lib.data.streams import DataParams, train_transforms
    sample = painted_sample(3)
    data = DataParams(resize=(30, 45), crop=(30, 45), flip=False, interpolation="bicubic")
    out = train_transforms(data, "unit")(sample, np.random.default_rng(0))
    expected = cv2.resize(sample["image"], (45, 30), interpolation=cv2.INTER_CUBIC).astype(np.float32) / 255
    np.testing.assert_allclose(out["image"].permute(1, 2, 0).numpy(), expected, atol=1e-6)
    np.testing.assert_array_equal(out["label"].numpy(), cv2.resize(sample["label"], (45, 30),
                                                                   interpolation=cv2.INTER_NEAREST))
