"""A pseudo-label set ``data/pseudo/<name>/``: its files, and :class:`PseudoLabels`, the reader the
self-training stages open it with (lib.pseudo.writer writes it, lib.pseudo.stream turns it into
training batches).

- ``meta.json``: form, model (folder name, its stage and method), dataset, split, class set,
  image count, the per-class ``predicted_fraction`` (share of all pixels predicted as the class)
  and ``kept_fraction`` (kept / predicted pixels of the class, 0 for a class never predicted),
  the threshold rule, the params;
- ``index.csv``: ``id, height, width`` and the files of the sample, relative to the set;
- ``soft`` (CPSL's first labels, Li et al., CVPR 2022): ``soft/<id>.npy`` float16 (C, h, w),
  the softmax at the logits' stride; ``prototypes.npy`` float32 (C, D) class centroids of the
  embedding; ``prior.npy`` float32 (C,) the class prior r (argmax shares on the logit grid);
- ``hard_threshold`` (CPSL's distillation labels): ``labels/<id>.png`` uint8 argmax of the
  (flip-averaged) softmax at the image size, ``conf/<id>.png`` its maximum as a uint8 code exact at
  the set's threshold t (:func:`encode_confidence`: code >= 128 exactly where the float32
  confidence is > t); the threshold is applied when the labels are loaded (conf <= t -> 255, CPSL's
  released code, t = 0.95 by default), and only at the t the set was written for.  (A float16 map,
  2 bytes a pixel, would be 12 GB for Cityscapes train at 2048x1024 and would move pixels within
  its rounding of t across it; the code is 1 byte before PNG compression);
- ``class_median`` (BAFFT step 2, after SIM's class-wise median, Wang et al., CVPR 2020):
  ``labels/<id>.png`` without flip, already set to 255 where conf < tau_c, tau_c the class's median
  float16 confidence capped at 0.9 (the confidence maps are kept only while the set is written);
- ``class_balanced`` (OUR ADDITION, CBST's class-balanced selection, Zou et al. ECCV 2018, on CPSL's
  flip-averaged hard labels): the same, labels set to 255 where conf < tau_c, tau_c the
  confidence that keeps the top ``class_portion`` of class c's pixels, capped at ``threshold``;
- ``labeller/``: a copy of the model artifact that made the set (``model.pt``, ``meta.json``).  A
  distillation round's frozen teacher is this labeller (CPSL's KD rounds distil the model whose
  hard labels they train on), so the teacher a stage reads is inside the set it depends on.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from lib.data.classes import IGNORE
from lib.errors import ConfigError, DataError
from lib.io import read_label_png
from lib.models.output import upsample

Form = Literal["soft", "hard_threshold", "class_median", "class_balanced"]
FORMS = ("soft", "hard_threshold", "class_median", "class_balanced")
# CPSL's hard labels average the softmax of the image and of its mirror image; its soft labels and
# SIM's do not flip
FLIP_DEFAULT = {"soft": False, "hard_threshold": True, "class_median": False, "class_balanced": True}
CLASS_THRESHOLD_FORMS = ("class_median", "class_balanced")     # tau_c from the confidence histogram
PSEUDO_ROOT = Path("data/pseudo")
META, INDEX, PROTOTYPES, PRIOR, CLASSES_CSV = "meta.json", "index.csv", "prototypes.npy", "prior.npy", "classes.csv"
LABELLER = "labeller"           # the copy of the model that made the set



CODE_KEPT = 128        # confidence codes >= this are above the set's threshold
CODE_STEPS = 128       # codes on each side of the threshold


def confident(conf: np.ndarray, threshold: float) -> np.ndarray:
    """Pixels kept by a threshold: conf > t (CPSL's released code: conf <= t becomes ignore),
    compared in float64."""
    return np.asarray(conf).astype(np.float64) > threshold


def encode_confidence(conf: np.ndarray, threshold: float) -> np.ndarray:
    """(H, W) uint8 code of a confidence map in [0, 1], exact at ``threshold`` t: code >= 128 iff
    conf > t (compared in float64).  Below, code = floor(127 conf / t) (steps of t / 127); above,
    code = 128 + floor(128 (conf - t) / (1 - t)), at most 255 (steps of (1 - t) / 128)."""
    conf = np.clip(np.asarray(conf, np.float64), 0.0, 1.0)
    kept = conf > threshold
    below = np.floor(conf / max(threshold, 1e-12) * (CODE_STEPS - 1))
    above = CODE_KEPT + np.floor((conf - threshold) / (1.0 - threshold) * CODE_STEPS)
    code = np.where(kept, np.clip(above, CODE_KEPT, 255), np.clip(below, 0, CODE_STEPS - 1))
    return code.astype(np.uint8)


def decode_confidence(code: np.ndarray, threshold: float) -> np.ndarray:
    """float32 values of :func:`encode_confidence`'s codes: the lower edge of a bin below t (<= t),
    the upper edge above (> t), so a value decoded from a code is on the same side of t as the
    confidence it was encoded from, and within one step of it."""
    code = np.asarray(code).astype(np.float64)
    below = code / (CODE_STEPS - 1) * threshold
    above = threshold + (code - (CODE_KEPT - 1)) / CODE_STEPS * (1.0 - threshold)
    kept = code >= CODE_KEPT
    value = np.where(kept, above, below).astype(np.float32)
    # float32 rounding may carry a value across t (code 127 decodes to t itself): step one ulp back
    wrong_side = (value.astype(np.float64) > threshold) != kept
    return np.where(wrong_side, np.nextafter(value, np.where(kept, np.float32(2), np.float32(0))), value)


def _load_npy(path: Path, what: str) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path}: {what} not found")
    try:
        return np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{path}: not a readable {what} ({first})") from None


def read_confidence(path: Path) -> np.ndarray:
    """A float16 (H, W) confidence map (the class forms' maps while their set is written); a missing
    or corrupt file is a DataError naming it."""
    array = _load_npy(path, "confidence map")
    if array.dtype != np.float16 or array.ndim != 2:
        raise DataError(f"{path}: expected a float16 (H, W) confidence map, found {array.dtype} {array.shape}")
    return array


def read_confidence_code(path: Path) -> np.ndarray:
    """A hard set's (H, W) uint8 confidence code; a missing or corrupt file is a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: confidence map not found")
    try:
        return read_label_png(path)
    except DataError:
        raise DataError(f"{path}: not a readable confidence map (expected an 8-bit single-channel PNG)") from None


class PseudoLabels:
    """A pseudo-label artifact ``data/pseudo/<name>/`` opened for reading.

    ``meta`` (meta.json), ``form``, ``path``, ``ids``, ``prototypes`` (torch float32 (C, D), soft
    form, else None), ``prior`` (torch float32 (C,), soft form, else None) and
    ``default_threshold`` (the load-time threshold the artifact was written for, or None).
    """

    def __init__(self, path: Path, meta: dict, index: pd.DataFrame, prototypes: torch.Tensor | None,
                 prior: torch.Tensor | None):
        self.path, self.meta, self.index = Path(path), meta, index
        self.prototypes, self.prior = prototypes, prior
        self._row = {sample_id: i for i, sample_id in enumerate(index["id"])}

    @classmethod
    def load(cls, path: str | Path) -> "PseudoLabels":
        path = Path(path)
        if not (path / META).is_file():
            raise DataError(f"{path}: pseudo-label artifact not found (no {META}; run its pseudo_label stage)")
        try:
            meta = json.loads((path / META).read_text())
        except json.JSONDecodeError as err:
            raise DataError(f"{path / META}: not valid JSON ({err})") from None
        if meta.get("form") not in FORMS:
            raise DataError(f"{path / META}: unknown pseudo-label form {meta.get('form')!r}")
        if not (path / INDEX).is_file():
            raise DataError(f"{path / INDEX}: pseudo-label index not found")
        index = pd.read_csv(path / INDEX, dtype={"id": str}, keep_default_na=False)
        files = {"soft": ["soft"], "hard_threshold": ["label", "conf"]}.get(meta["form"], ["label"])
        missing = [c for c in ["id", "height", "width", *files] if c not in index.columns]
        if missing:
            raise DataError(f"{path / INDEX}: missing column '{missing[0]}'")
        if meta["form"] == "hard_threshold" and len(index) and not str(index["conf"].iloc[0]).endswith(".png"):
            raise DataError(f"{path / INDEX}: confidence stored as {index['conf'].iloc[0]!r}, not the 8-bit code "
                            f"(conf/<id>.png) this version reads: rerun its stage (dvc repro -f pseudo_label@{path.name})")
        prototypes = prior = None
        if meta["form"] == "soft":
            prototypes = torch.from_numpy(_load_npy(path / PROTOTYPES, "prototype matrix").astype(np.float32))
            prior = torch.from_numpy(_load_npy(path / PRIOR, "class prior").astype(np.float32))
            if prototypes.shape[:1] != (meta["num_classes"],) or prior.shape != (meta["num_classes"],):
                raise DataError(f"{path}: prototypes {tuple(prototypes.shape)} or prior {tuple(prior.shape)} "
                                f"do not have {meta['num_classes']} classes")
        return cls(path, meta, index, prototypes, prior)

    @property
    def labeller(self) -> Path:
        """The copy of the model artifact that made the set (a distillation round's teacher)."""
        return self.path / LABELLER

    @property
    def form(self) -> str:
        return self.meta["form"]

    @property
    def ids(self) -> list[str]:
        return self.index["id"].tolist()

    @property
    def default_threshold(self) -> float | None:
        return (self.meta.get("threshold") or {}).get("load_time")

    def __contains__(self, sample_id: str) -> bool:
        return sample_id in self._row

    def row_of(self, sample_id: str) -> pd.Series:
        """The index row of one sample; an unknown id is a DataError naming the set."""
        if sample_id not in self._row:
            raise DataError(f"{self.path}: no pseudo-label for sample '{sample_id}' (the artifact "
                            f"covers {self.meta.get('dataset')}/{self.meta.get('split')}, {len(self._row)} images)")
        return self.index.iloc[self._row[sample_id]]

    def stored_soft(self, sample_id: str) -> np.ndarray:
        """The soft form's stored map of one sample: float16 (C, h, w), the softmax at the logits' stride."""
        path = self.path / self.row_of(sample_id)["soft"]
        soft = _load_npy(path, "soft pseudo-label")
        if soft.ndim != 3 or soft.shape[0] != self.meta["num_classes"]:
            raise DataError(f"{path}: expected ({self.meta['num_classes']}, h, w) probabilities, "
                            f"found shape {soft.shape}")
        return soft

    def stored_soft_size(self, sample_id: str) -> tuple[int, int]:
        """(h, w) of :meth:`stored_soft` from the file's header alone."""
        path = self.path / self.row_of(sample_id)["soft"]
        try:
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
        except (ValueError, OSError, EOFError):
            shape = self.stored_soft(sample_id).shape     # the one-line error of a missing or corrupt file
        return int(shape[-2]), int(shape[-1])

    def sample(self, sample_id: str, threshold: float | None = None) -> dict:
        """The maps of one sample at its image size.

        ``pseudo``: (H, W) uint8 train IDs, 255 where conf <= ``threshold`` (None: no threshold;
        a hard set is thresholded only at the threshold it was written for; class_median labels
        carry their 255s already).  For the soft form also ``soft``: (H, W, C)
        float32, the stored softmax upsampled bilinearly with align_corners=True (our choice: the
        convention every logit map of the project is upsampled with, lib.models.output.upsample);
        its ``pseudo`` is the argmax of that upsampled map and conf its maximum.  (A training stream
        keeps the soft map at its stored size instead: lib.pseudo.stream.)
        """
        row = self.row_of(sample_id)
        size = (int(row["height"]), int(row["width"]))
        out = {}
        if self.form == "soft":
            soft = self.stored_soft(sample_id)
            with torch.no_grad():
                full = upsample(torch.from_numpy(soft.astype(np.float32))[None], size)[0]
                conf, pseudo = full.max(0)
            out["soft"] = full.permute(1, 2, 0).contiguous().numpy()
            conf, pseudo = conf.numpy(), pseudo.numpy().astype(np.uint8)
        else:
            pseudo = read_label_png(self.path / row["label"])
            if pseudo.shape != size:
                raise DataError(f"{self.path / row['label']}: label {pseudo.shape} is not the indexed size {size}")
        if threshold is not None:
            if self.form != "soft":
                self.check_threshold(threshold)
            if self.form == "soft":
                kept = confident(conf, threshold)
            else:
                code = read_confidence_code(self.path / row["conf"])
                if code.shape != size:
                    raise DataError(f"{self.path / row['conf']}: confidence {code.shape} is not the indexed size {size}")
                kept = code >= CODE_KEPT
            pseudo = np.where(kept, pseudo, IGNORE).astype(np.uint8)
        out["pseudo"] = pseudo
        return out

    def check_threshold(self, threshold: float) -> None:
        """A load-time threshold this set can apply exactly (:func:`load_threshold_error`)."""
        error = load_threshold_error(self.form, self.default_threshold, threshold, self.path.name)
        if error:
            raise ConfigError(f"{self.path}: {error}")


def load_threshold_error(form: str, written: float | None, threshold: float, name: str) -> str | None:
    """Why set ``name`` of ``form``, written for threshold ``written``, cannot apply a load-time
    ``threshold`` (None: it can): a hard set only the one it was written for, the soft form and the
    class forms none (probabilities, and labels thresholded when written)."""
    if form == "soft":
        return (f"soft pseudo-labels are probabilities, not thresholded labels; a load-time "
                f"pseudo_threshold ({threshold}) has nothing to act on (set it to null)")
    if form in CLASS_THRESHOLD_FORMS:
        return (f"{form} pseudo-labels were thresholded per class when written; a load-time "
                f"pseudo_threshold ({threshold}) would undo that (set it to null)")
    if form == "hard_threshold" and threshold != written:
        return (f"its confidence is stored exactly at the threshold it was written for ({written}), not at "
                f"the load-time pseudo_threshold {threshold}; set pseudo_labels.{name}.options.threshold: "
                f"{threshold} (or the recipe's pseudo_threshold: {written})")
    return None
