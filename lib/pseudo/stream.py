"""Training batches of a pseudo-labelled split: the target stream of a self-training stage."""
from __future__ import annotations

import functools
from pathlib import Path

from lib.data.dataset import ImagesOnly
from lib.data.prepared import PREPARED_ROOT, require_prepared
from lib.data.sampling import uniform_stream
from lib.data.streams import DataParams, StreamFactory, batches_from, train_transforms
from lib.data.transforms import Transform
from lib.errors import ConfigError, DataError
from lib.pseudo.artifact import CLASS_THRESHOLD_FORMS, PseudoLabels


class PseudoLabelledDataset(ImagesOnly):
    """A prepared split whose items carry pseudo-labels instead of the ground truth.

    ``load(i)`` returns ``id``, ``image`` and the maps of ``pseudo.sample(id, threshold)``:
    ``pseudo`` (uint8: the transforms move it like a label, nearest, padded with 255) and, for
    the soft form, ``soft`` (float: bilinear, padded with 0; (C, H, W) after Normalize).  The
    dataset's own label is never read.
    """

    def __init__(self, prepared_dir: str | Path, split: str, transforms: Transform, seed: int,
                 pseudo: PseudoLabels, threshold: float | None = None, project_root: str | Path = "."):
        super().__init__(prepared_dir, split, transforms, seed, labelled=False, project_root=project_root)
        missing = [sample_id for sample_id in self.ids if sample_id not in pseudo]
        if missing:
            raise DataError(f"{pseudo.path}: no pseudo-labels for {len(missing)} of the {len(self)} samples "
                            f"of {prepared_dir} split '{split}' (first: {missing[0]})")
        self.pseudo, self.threshold = pseudo, threshold

    def load(self, i: int) -> dict:
        sample = super().load(i)
        maps = self.pseudo.sample(sample["id"], self.threshold)
        if maps["pseudo"].shape != sample["image"].shape[:2]:
            raise DataError(f"{self.pseudo.path}: pseudo-label of '{sample['id']}' is "
                            f"{maps['pseudo'].shape} but its image is {sample['image'].shape[:2]}")
        return {**sample, **maps}


def pseudo_stream(dataset_name: str, pseudo: PseudoLabels, threshold: float | None, data: DataParams,
                  normalize: str, seed: int) -> StreamFactory:
    """Endless batches of pseudo-labelled ``dataset_name`` (lib.data.streams'
    machinery: the same transforms, uniform draws, resumable at an iteration).

    ``normalize`` is a key of ``lib.data.streams.NORMALIZATION``; ``threshold`` is applied at load time
    (pass ``pseudo.default_threshold`` for the artifact's own).  Batches hold ``image``,
    ``pseudo`` (N, H, W) int64 and for the soft form ``soft`` (N, C, H, W) float32, ``id``, ``draw``.
    """
    if data.sampling != "uniform":
        raise ConfigError(f"params: pseudo-labelled streams sample uniformly (got sampling '{data.sampling}')")
    if pseudo.meta.get("dataset") != dataset_name:
        raise ConfigError(f"{pseudo.path}: pseudo-labels of dataset '{pseudo.meta.get('dataset')}' "
                          f"cannot label '{dataset_name}'")
    if threshold is not None and pseudo.form in CLASS_THRESHOLD_FORMS:
        raise ConfigError(f"{pseudo.path}: {pseudo.form} pseudo-labels were thresholded per class when written; "
                          f"a load-time pseudo_threshold ({threshold}) would undo that (set it to null)")
    require_prepared(dataset_name)
    dataset = PseudoLabelledDataset(PREPARED_ROOT / dataset_name, data.split,
                                    train_transforms(data, normalize), seed, pseudo, threshold)
    draws = functools.partial(uniform_stream, len(dataset), seed)
    return batches_from(dataset, draws, data)
