"""Style transfer (FDA, Reinhard, Lab) properties and the stylized prepared-dataset copy."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from skimage import color

from lib.config import parse
from lib.data.dataset import PreparedDataset
from lib.data.prepared import INDEX_COLUMNS, load_centroids, load_class_counts, load_index, load_meta
from lib.data.transforms import Compose, Normalize, RandomCrop
from lib.train.stage import DataParams, training_stream
from lib.errors import ConfigError, DataError
from lib.io import read_rgb
from lib.stylize.cache import equal_size_batches, write_prepared_copy
from lib.stylize.paired import StylizeParams, run_stylize, style_pairing
from lib.stylize.transfer import (fda, lab_to_rgb, lab_transfer, lalphabeta_to_rgb, parse_transfer, reinhard,
                                  resize_to, rgb_to_lab, rgb_to_lalphabeta)
from stages import stylize as stage
from tests import layouts as L

CPU = torch.device("cpu")
FAST = settings(max_examples=25, deadline=None)


def images(seed: int, height: int, width: int, low: float = 0, high: float = 255, batch: int = 2) -> torch.Tensor:
    """Random float64 RGB images; float64 keeps the algebraic checks tight."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.uniform(low, high, (batch, 3, height, width)))


def centred_spectrum(x: torch.Tensor) -> torch.Tensor:
    return torch.fft.fftshift(torch.fft.fft2(x), dim=(-2, -1))


sizes = st.tuples(st.integers(2, 12), st.integers(2, 12))


# ---------------------------------------------------------------- FDA

@FAST
@given(seed=st.integers(0, 2**16), size=sizes)
def test_fda_beta_zero_is_exactly_the_input(seed, size):
    content, style = images(seed, *size), images(seed + 1, *size)
    assert torch.equal(fda(content, style, 0.0), content)


@FAST
@given(seed=st.integers(0, 2**16), size=sizes, beta=st.floats(0.001, 0.499))
def test_fda_swaps_the_centred_amplitude_window_and_keeps_the_phase(seed, size, beta):
    height, width = size
    content, style = images(seed, height, width), images(seed + 1, height, width)
    out = fda(content, style, beta)
    b = math.floor(beta * min(height, width))
    window = np.zeros((height, width), bool)
    window[height // 2 - b: height // 2 + b + 1, width // 2 - b: width // 2 + b + 1] = True
    window = torch.from_numpy(window)
    spec_out, spec_content, spec_style = map(centred_spectrum, (out, content, style))
    torch.testing.assert_close(spec_out.abs()[..., window], spec_style.abs()[..., window])
    torch.testing.assert_close(spec_out.abs()[..., ~window], spec_content.abs()[..., ~window])
    visible = (spec_out.abs() > 1e-6 * spec_out.abs().amax()) & (spec_content.abs() > 1e-6 * spec_content.abs().amax())
    # compare phases as unit complex numbers, so -pi and pi agree
    phase_out, phase_content = spec_out[visible] / spec_out[visible].abs(), spec_content[visible] / spec_content[visible].abs()
    torch.testing.assert_close(phase_out, phase_content)


@FAST
@given(seed=st.integers(0, 2**16), size=sizes, beta=st.floats(0.0, 0.499))
def test_fda_of_an_image_with_itself_is_the_identity(seed, size, beta):
    content = images(seed, *size)
    torch.testing.assert_close(fda(content, content, beta), content)


def test_fda_is_not_clipped():
    out = fda(images(0, 16, 20), images(1, 16, 20, 0, 60), 0.3)
    assert out.min() < 0 or out.max() > 255


def test_fda_resizes_a_style_of_another_size_first():
    content, style = images(2, 16, 20), images(3, 24, 18)
    torch.testing.assert_close(fda(content, style, 0.1), fda(content, resize_to(style, (16, 20)), 0.1))


@pytest.mark.parametrize("beta", [-0.1, 0.5, 1.0])
def test_fda_rejects_a_window_outside_the_spectrum(beta):
    with pytest.raises(ValueError, match="beta"):
        fda(images(0, 8, 8), images(1, 8, 8), beta)


# ---------------------------------------------------------------- Reinhard and Lab transfer

def channel_moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.std_mean(x, dim=(-2, -1), correction=0)


def style_images(seed: int, height: int, width: int) -> torch.Tensor:
    """Mid-range images of modest contrast: transferring their statistics rarely needs clipping."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(90, 160, (2, 3, 1, 1))
    return torch.from_numpy(centre + rng.uniform(-25, 25, (2, 3, height, width)))


@FAST
@given(seed=st.integers(0, 2**16), size=sizes)
def test_reinhard_output_has_the_style_lalphabeta_mean_and_std(seed, size):
    content, style = images(seed, *size, 20, 235), style_images(seed + 1, *size)
    out = reinhard(content, style)
    assume(bool(((out > 0) & (out < 255)).all()))   # clipping would (rightly) change the statistics
    for got, want in zip(channel_moments(rgb_to_lalphabeta(out)), channel_moments(rgb_to_lalphabeta(style))):
        torch.testing.assert_close(got, want)


@FAST
@given(seed=st.integers(0, 2**16), size=sizes)
def test_lab_transfer_output_has_the_style_lab_mean_and_std(seed, size):
    content, style = images(seed, *size, 20, 235), style_images(seed + 1, *size)
    out = lab_transfer(content, style)
    assume(bool(((out > 0) & (out < 255)).all()))
    for got, want in zip(channel_moments(rgb_to_lab(out)), channel_moments(rgb_to_lab(style))):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("transfer", [reinhard, lab_transfer])
def test_colour_transfer_of_an_image_with_itself_is_the_identity(transfer):
    content = images(4, 10, 12, 1, 255)
    torch.testing.assert_close(transfer(content, content), content)


@pytest.mark.parametrize("transfer", [reinhard, lab_transfer])
def test_colour_transfer_clips_unless_told_not_to(transfer):
    content, style = images(6, 8, 8), images(7, 8, 8, 0, 40)
    style[..., :2, :2] = 255   # a few bright outliers inflate the style's std: results overshoot
    raw = transfer(content, style, clip=False)
    assert raw.min() < 0 or raw.max() > 255
    torch.testing.assert_close(transfer(content, style), raw.clamp(0, 255))


@pytest.mark.parametrize("transfer", [reinhard, lab_transfer])
def test_colour_transfer_of_a_flat_image_takes_the_style_mean(transfer):
    flat = torch.full((1, 3, 6, 6), 80.0, dtype=torch.float64)
    out = transfer(flat, style_images(5, 6, 6)[:1])
    assert torch.isfinite(out).all() and out.std(dim=(-2, -1)).max() < 1e-6


@FAST
@given(seed=st.integers(0, 2**16), size=sizes)
def test_colour_spaces_round_trip(seed, size):
    rgb = images(seed, *size)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb)
    torch.testing.assert_close(lalphabeta_to_rgb(rgb_to_lalphabeta(rgb)), rgb)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_lab_conversion_agrees_with_scikit_image(seed):
    rgb = images(seed, 9, 11, batch=1)
    ours = rgb_to_lab(rgb)[0].permute(1, 2, 0).numpy()
    theirs = color.rgb2lab(rgb[0].permute(1, 2, 0).numpy() / 255)
    np.testing.assert_allclose(ours, theirs, atol=1e-3)
    back = lab_to_rgb(torch.from_numpy(theirs).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(back, color.lab2rgb(theirs) * 255, atol=1e-2)


# ---------------------------------------------------------------- transfer specs and params

@pytest.mark.parametrize("spec, kind, beta", [("fda", "fda", 0.01), ("fda:0.09", "fda", 0.09), ("fda:0", "fda", 0.0),
                                              ("reinhard", "reinhard", None), ("lab", "lab", None)])
def test_transfer_specs(spec, kind, beta):
    transfer = parse_transfer(spec, 0.01, "stylize.outputs.x")
    assert (transfer.kind, transfer.beta) == (kind, beta)


@pytest.mark.parametrize("spec", ["FDA", "fda:", "fda:abc", "fda:0.5", "fda:-0.1", "fda:nan", "cyclegan", 3, None])
def test_bad_transfer_specs_name_the_key_and_the_forms(spec):
    with pytest.raises(ConfigError, match=r"stylize\.outputs\.x = .*expected fda, fda:<beta>.*reinhard or lab"):
        parse_transfer(spec, 0.01, "stylize.outputs.x")


def stylize_params(**changes) -> StylizeParams:
    raw = {"source": "gta", "style": "cs", "outputs": {"gta_fda": "fda", "gta_lab": "lab"}, "batch_size": 2,
           "workers": 0, **changes}
    return parse(StylizeParams, raw, "stylize")


@pytest.mark.parametrize("changes, message", [
    ({"outputs": {"gta": "fda"}}, r"stylize\.outputs\.gta: an output cannot replace its own source"),
    ({"outputs": {"cs": "lab"}}, r"stylize\.outputs\.cs: an output cannot replace"),
    ({"outputs": {"x": "fft"}}, r"stylize\.outputs\.x = 'fft'"),
    ({"fda_beta": 0.6}, r"stylize\.fda_beta must be in"),
    ({"splits": []}, r"stylize\.splits"),
    ({"batch_size": 0}, r"stylize\.batch_size"),
])
def test_bad_stylize_params(changes, message):
    with pytest.raises(ConfigError, match=message):
        stylize_params(**changes)


def test_unknown_output_name_is_an_error():
    with pytest.raises(ConfigError, match="no output 'nope' under 'stylize.outputs' \\(known: gta_fda, gta_lab\\)"):
        stylize_params().transfer("nope")


# ---------------------------------------------------------------- batching and pairing

@FAST
@given(sizes=st.lists(st.sampled_from([(4, 8), (4, 6), (5, 8)]), max_size=30), batch_size=st.integers(1, 5))
def test_equal_size_batches_are_consecutive_runs_of_one_size(sizes, batch_size):
    batches = equal_size_batches([h for h, _ in sizes], [w for _, w in sizes], batch_size)
    assert [i for b in batches for i in b] == list(range(len(sizes)))
    assert all(len({sizes[i] for i in b}) == 1 and len(b) <= batch_size for b in batches)
    for before, after in zip(batches, batches[1:]):   # a batch is cut short only by a size change
        assert len(before) == batch_size or sizes[before[-1]] != sizes[after[0]]


def test_style_pairing_is_seeded_by_seed_and_output_name():
    pairs = style_pairing(500, 7, 0, "gta_fda")
    np.testing.assert_array_equal(pairs, style_pairing(500, 7, 0, "gta_fda"))
    assert pairs.min() >= 0 and pairs.max() < 7 and len(set(pairs)) == 7
    assert not np.array_equal(pairs, style_pairing(500, 7, 1, "gta_fda"))
    assert not np.array_equal(pairs, style_pairing(500, 7, 0, "gta_lab"))


# ---------------------------------------------------------------- the prepared copy

@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A project root with prepared datasets gta (train 4 / val 2, labelled) and cs (train 3)."""
    return L.prepare_gta_and_cityscapes(tmp_path_factory.mktemp("project"),
                                        {"trainIds": [1, 2, 3, 4], "valIds": [5, 6]})


def double_minus_100(images: torch.Tensor, ids: list[str]) -> torch.Tensor:
    return images.float() * 2 - 100


def test_prepared_copy_contract(project, monkeypatch):
    monkeypatch.chdir(project)
    source, out = Path("data/prepared/gta"), Path("data/prepared/gta_x")
    stats = write_prepared_copy(source, out, double_minus_100, splits=["train", "val"], batch_size=3, device=CPU,
                                desc="test", meta={"transfer": "affine"}, examples=Path("examples"), n_examples=3)
    src, index = load_index(source), load_index(out)
    assert list(index.columns) == INDEX_COLUMNS
    pd.testing.assert_frame_equal(index.drop(columns="image"), src.drop(columns="image"))
    assert list(index["image"]) == [f"data/prepared/gta_x/images/{s}/{i}.png" for i, s in zip(index["id"], index["split"])]
    assert not (out / "labels").exists()    # labels are shared, not copied
    clipped = values = 0
    for row in index.itertuples():
        expected = read_rgb(src.set_index("id").loc[row.id, "image"]).astype(float) * 2 - 100
        np.testing.assert_array_equal(read_rgb(row.image), np.clip(expected, 0, 255).astype(np.uint8))
        clipped, values = clipped + ((expected < 0) | (expected > 255)).sum(), values + expected.size
    assert stats == {"images": 6, "clipped_fraction": pytest.approx(clipped / values)}
    np.testing.assert_array_equal(load_class_counts(out, list(index["id"])), load_class_counts(source, list(index["id"])))
    pd.testing.assert_frame_equal(load_centroids(out), load_centroids(source))
    meta, source_meta = load_meta(out), load_meta(source)
    assert meta["name"] == "gta_x" and meta["derived_from"] == "gta" and meta["stylization"] == {"transfer": "affine"}
    assert meta["stats"] == stats and meta["counts"] == {"train": 4, "val": 2} == meta["labelled"]
    assert meta["class_protocol"] == source_meta["class_protocol"]
    assert meta["pixels_per_class"] == source_meta["pixels_per_class"]
    panels = sorted(Path("examples").glob("*.png"))
    assert [p.stem for p in panels] == list(index["id"][:3])
    assert read_rgb(panels[0]).shape == (L.H, 2 * L.W + 4, 3)


def test_prepared_copy_of_some_splits_keeps_only_their_rows(project, monkeypatch):
    monkeypatch.chdir(project)
    write_prepared_copy(Path("data/prepared/gta"), Path("data/prepared/gta_val"), double_minus_100, splits=["val"],
                        batch_size=4, device=CPU, desc="test", meta={})
    ids = list(load_index("data/prepared/gta_val")["id"])
    assert ids == ["00005", "00006"] and set(load_centroids("data/prepared/gta_val")["id"]) == set(ids)
    assert len(load_class_counts("data/prepared/gta_val")) == 2
    assert load_meta("data/prepared/gta_val")["counts"] == {"val": 2}


def test_prepared_copy_is_atomic(project, monkeypatch):
    monkeypatch.chdir(project)

    def fails_on_second_batch(images, ids):
        if "00003" in ids:
            raise RuntimeError("render failed")
        return images.float()

    with pytest.raises(RuntimeError, match="render failed"):
        write_prepared_copy(Path("data/prepared/gta"), Path("data/prepared/gta_broken"), fails_on_second_batch,
                            splits=["train"], batch_size=2, device=CPU, desc="test", meta={}, examples=Path("ex_broken"))
    assert not Path("data/prepared/gta_broken").exists() and not Path("ex_broken").exists()
    assert not list(Path("data/prepared").glob(".gta_broken*"))


def test_prepared_copy_checks_the_render_output(project, monkeypatch):
    monkeypatch.chdir(project)
    with pytest.raises(ValueError, match="render returned shape"):
        write_prepared_copy(Path("data/prepared/gta"), Path("data/prepared/gta_bad"), lambda im, ids: im[:, :1].float(),
                            splits=["train"], batch_size=2, device=CPU, desc="test", meta={})
    with pytest.raises(ValueError, match="cannot replace its source"):
        write_prepared_copy(Path("data/prepared/gta"), Path("data/prepared/../prepared/gta"), double_minus_100,
                            splits=["train"], batch_size=2, device=CPU, desc="test", meta={})
    assert load_index("data/prepared/gta", "train")["image"][0].startswith("raw/")
    with pytest.raises(DataError, match="no samples in split 'test'"):
        write_prepared_copy(Path("data/prepared/gta"), Path("data/prepared/gta_bad"), double_minus_100,
                            splits=["test"], batch_size=2, device=CPU, desc="test", meta={})


def test_stylized_copy_trains_like_any_prepared_dataset(project, monkeypatch):
    monkeypatch.chdir(project)
    run_stylize("gta_fda", stylize_params(), Path("data/prepared/gta_fda"), None, CPU)
    dataset = PreparedDataset("data/prepared/gta_fda", "train", Compose([RandomCrop(8, 8), Normalize()]), 0,
                              labelled=True)
    assert len(dataset) == 4 and dataset[0]["label"].shape == (8, 8)
    for sampling in ("uniform", "class_uniform"):
        data = DataParams(batch_size=2, crop=(8, 8), workers=0, sampling=sampling)
        batch = next(training_stream("gta_fda", data, "imagenet", 0, labelled=True)(0))
        assert batch["image"].shape == (2, 3, 8, 8) and batch["label"].shape == (2, 8, 8)


def test_run_stylize_pairs_deterministically_and_workers_do_not_matter(project, monkeypatch):
    monkeypatch.chdir(project)
    outs = {}
    for workers in (0, 2):
        out = Path(f"data/prepared/gta_lab_{workers}")
        run_stylize("gta_lab", stylize_params(workers=workers), out, None, CPU)
        outs[workers] = {p.relative_to(out): p.read_bytes() for p in out.glob("images/*/*.png")}
    assert len(outs[0]) == 4 and outs[0] == outs[2]
    meta = load_meta("data/prepared/gta_lab_0")
    assert meta["stylization"]["transfer"] == "lab" and meta["stylization"]["style"] == "cs"
    # the pairing: image i restyled by style row pairs[i], transfer applied to exactly that pair
    src, style = load_index("data/prepared/gta", "train"), load_index("data/prepared/cs", "train")
    pairs = style_pairing(4, 3, 0, "gta_lab")
    first = torch.from_numpy(read_rgb(src["image"][0])).permute(2, 0, 1)[None].float()
    paired = torch.from_numpy(read_rgb(style["image"][pairs[0]])).permute(2, 0, 1)[None].float()
    expected = lab_transfer(first, paired).round()[0].permute(1, 2, 0).numpy().astype(np.uint8)
    np.testing.assert_array_equal(read_rgb(f"data/prepared/gta_lab_0/images/train/{src['id'][0]}.png"), expected)


def write_params(stylize: dict) -> None:
    Path("params.yaml").write_text(yaml.safe_dump({"stylize": stylize}))


@pytest.mark.parametrize("changes, argv, message", [
    ({}, ["nope"], "no output 'nope' under 'stylize.outputs'"),
    ({"outputs": {"gta_r": "reinhard:2"}}, ["gta_r"], "stylize.outputs.gta_r = 'reinhard:2' is not a transfer"),
    ({"source": "missing"}, ["gta_fda"], "data/prepared/missing/index.csv: missing"),
    ({"style": "absent"}, ["gta_fda"], "data/prepared/absent/index.csv: missing"),
    ({"style_split": "val"}, ["gta_fda"], "no samples in split 'val'"),
])
def test_stage_reports_bad_input_in_one_line(project, monkeypatch, capsys, changes, argv, message):
    monkeypatch.chdir(project)
    write_params({"source": "gta", "style": "cs", "outputs": {"gta_fda": "fda"}, **changes})
    with pytest.raises(SystemExit) as exit_info:
        stage.main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
