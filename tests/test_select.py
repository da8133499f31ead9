"""Checkpoint selection (lib.train.select): the best on a validation split kept beside the last,
named ``<model>/best`` in the table, evaluated beside the last; the last is untouched by it."""
from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

import lib.infer.evaluation as evaluation
import lib.train.loop as loop
from lib.data.convert import PrepareParams, parse_dataset_spec, prepare_dataset
from lib.errors import ConfigError
from lib.infer.summary import markdown, summarize
from lib.models.files import MODEL_FILE
from lib.pseudo.writer import pseudo_row
from lib.table import check_acyclic, find_training_row, upstream
from lib.train.select import SelectParams, Selection
from stages.evaluate import main as evaluate_stage
from tests import layouts as L
from tests.tables import one_row, train

RECIPE = {"model": {"arch": "deeplabv2", "depth": 18, "bn": "batch", "aux": True},
          "data": {"batch_size": 2, "crop": [16, 32], "workers": 0},
          "optim": {"model": {"type": "adamw", "lr": 1e-2, "weight_decay": 0.0, "head_lr_mult": 1.0}},
          "train": {"iters": 6, "seed": 3, "checkpoint_every": 2, "log_every": 1, "precision": "fp32"}}
SELECT = {"every": 2, "domain": "target", "split": "val", "images": 2, "batch_size": 2}


# ------------------------------------------------------------------------- the running best
class Scripted(nn.Module):
    """A model whose score is scripted; it draws from the RNG and records its mode when scored."""

    def __init__(self, scores):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.bn = nn.BatchNorm1d(1)
        self.scores, self.modes = list(scores), []

    def score(self, model) -> float:
        self.modes.append((model.training, model.bn.training))
        torch.rand(3)                                   # scoring may use the RNG; training must not notice
        self.weight.data += 1
        return self.scores.pop(0)


def test_the_best_is_the_first_maximum_and_scoring_leaves_modes_and_rng_alone():
    model = Scripted([1.0, 3.0, float("nan"), 3.0, 2.0])
    model.train()
    model.bn.eval()                                      # a sub-module kept in eval mode by its method
    selection = Selection(SelectParams(every=2), model, model.score, iters=9)
    assert [d for d in range(1, 10) if selection.due(d)] == [2, 4, 6, 8, 9]
    for done in (2, 4, 6, 8, 9):
        torch.manual_seed(done)
        selection.evaluate(done)
        after = torch.rand(1)
        torch.manual_seed(done)
        assert torch.equal(after, torch.rand(1))         # the RNG is where it was before scoring
        assert model.training and not model.bn.training   # every module back in its mode
    assert model.modes == [(False, False)] * 5           # scored in eval mode
    assert (selection.best_iteration, selection.best_score) == (4, 3.0)   # ties keep the earlier
    assert torch.equal(selection.best_state["weight"], torch.tensor([2.0]))   # its weights as they were then
    resumed = Selection(SelectParams(every=2), model, model.score, iters=9)
    resumed.load_state_dict(selection.state_dict())
    assert resumed.summary() == selection.summary()


def test_no_selection_when_every_is_zero():
    assert not any(Selection(SelectParams(), nn.Linear(1, 1), lambda m: 0.0, 10).due(d) for d in range(1, 11))


# ------------------------------------------------------------------------- a training that selects
@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """gta (6 labelled frames) and cs (train 3, val 3) prepared."""
    root = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(0)
    with contextlib.chdir(root):
        L.make_gta5(Path("raw/gta5"), rng, n=6)
        L.make_cityscapes(Path("raw/cs"), rng, {"train": 3, "val": 3})
        params = PrepareParams(workers=1, centroid_tile=1024)
        for name, spec in {"gta": {"layout": "gta5", "root": "raw/gta5"},
                           "cs": {"layout": "cityscapes", "root": "raw/cs", "splits": ["train", "val"]}}.items():
            prepare_dataset(parse_dataset_spec(name, spec), Path("data/prepared") / name, params)
    return root


def params_with(select: dict | None, **rows) -> dict:
    recipe = {**RECIPE, **({"select": select} if select else {})}
    params = one_row("warmup", "source_only", recipe, "gta", "cs")
    params["models"].update(rows)
    return params


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path / MODEL_FILE, weights_only=True)["state_dict"]


def fresh(name: str) -> None:
    for folder in (Path("data/models") / name, Path("data/checkpoints") / name):
        shutil.rmtree(folder, ignore_errors=True)


def test_selection_keeps_the_best_beside_an_untouched_last_and_selects_the_same_again(project, monkeypatch):
    monkeypatch.chdir(project)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.set_num_threads(1)
    fresh("warmup")
    train(params_with(None), "warmup")
    plain = weights(Path("data/models/warmup"))
    assert not Path("data/models/warmup/best").exists()

    fresh("warmup")
    train(params_with(SELECT), "warmup")
    last, best_dir = Path("data/models/warmup"), Path("data/models/warmup/best")
    assert all(torch.equal(plain[k], v) for k, v in weights(last).items())   # selection changed no update
    meta = json.loads((last / "meta.json").read_text())
    selection = meta["selection"]
    assert [it for it, _ in selection["history"]] == [2, 4, 6]
    scores = [score for _, score in selection["history"]]
    assert selection["best_iteration"] == [2, 4, 6][int(np.argmax(scores))]
    assert json.loads((best_dir / "meta.json").read_text())["iteration"] == selection["best_iteration"]
    curve = (Path("metrics/train/warmup/plots/metrics/select/mIoU.tsv")).read_text().split()
    assert curve[:2] == ["step", "mIoU"] and [int(s) for s in curve[2::2]] == [2, 4, 6]
    best = weights(best_dir)
    if selection["best_iteration"] == 6:
        assert all(torch.equal(best[k], v) for k, v in weights(last).items())
    else:
        assert any(not torch.equal(best[k], v) for k, v in weights(last).items())

    # a re-run from scratch selects the same iteration and the same weights
    fresh("warmup")
    train(params_with(SELECT), "warmup")
    assert json.loads((last / "meta.json").read_text())["selection"] == selection
    assert all(torch.equal(best[k], v) for k, v in weights(best_dir).items())

    # killed after the checkpoint at 4 and resumed: the same selection (its state is in the checkpoint)
    fresh("warmup")
    check = loop._check_finite

    def killed_at_5(losses, it, path):
        if it == 4:
            raise KeyboardInterrupt
        return check(losses, it, path)

    monkeypatch.setattr(loop, "_check_finite", killed_at_5)
    with pytest.raises(KeyboardInterrupt):
        train(params_with(SELECT), "warmup")
    monkeypatch.setattr(loop, "_check_finite", check)
    train(params_with(SELECT), "warmup")
    assert json.loads((last / "meta.json").read_text())["selection"] == selection
    assert all(torch.equal(best[k], v) for k, v in weights(best_dir).items())

    # the evaluation scores both; the summary shows the last with the best beside it
    params = params_with(SELECT)
    params["evaluate"] = {"models": params["models"], "targets": ["cs"], "split": "val", "batch_size": 2,
                          "workers": 0, "panels": 0}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    evaluate_stage(["warmup", "cs"])
    report = json.loads(Path("metrics/eval/warmup/cs.json").read_text())
    assert report["best"]["iteration"] == selection["best_iteration"] and report["best"]["images"] == 3
    assert set(report["best"]["classes"]) >= {"road", "bicycle"}
    row = summarize({"warmup": {"cs": report}}, {})["warmup"]
    assert row == {"cs": {"mIoU": report["mIoU"], "mAcc": report["mAcc"], "best_mIoU": report["best"]["mIoU"]},
                   "selected": {"iteration": selection["best_iteration"]}}
    assert markdown({"warmup": row}).splitlines()[2] == (f"| warmup | {report['mIoU']:.2f} ({report['best']['mIoU']:.2f})"
                                                         f" | {selection['best_iteration']} |")

    # and a row can start from it
    params = params_with(SELECT, tuned={"recipe": "source_only", "from": "warmup/best"})
    row = find_training_row(params, "tuned")
    assert row.start == "warmup/best" and upstream(params, "tuned") == ["warmup"]
    out = train(params, "tuned")
    assert json.loads((out / "meta.json").read_text())["from"] == "warmup/best"


def test_best_is_named_only_for_a_model_whose_recipe_selects(project):
    params = params_with(None, tuned={"recipe": "source_only", "from": "warmup/best"})
    with pytest.raises(ConfigError, match=r"models.tuned.from 'warmup/best': warmup keeps no selected checkpoint; "
                                          r"set select.every > 0"):
        find_training_row(params, "tuned")
    params = params_with(SELECT, tuned={"recipe": "source_only", "from": "warmup/last"})
    with pytest.raises(ConfigError, match=r"`<model>/best`"):
        find_training_row(params, "tuned")
    params = params_with(SELECT)
    params["pseudo_labels"] = {"soft": {"model": "warmup/best", "form": "soft"}}
    assert pseudo_row(params, "soft")[0].model == "warmup/best"
    params["selftrained"] = {"st": {"recipe": "source_only", "from": "warmup", "pseudo": "soft"}}
    assert upstream(params, "st") == ["warmup", "warmup"]
    params["models"]["warmup"]["from"] = "st/best"
    with pytest.raises(ConfigError, match="grows in a circle"):
        check_acyclic(params)


def test_a_checkpoint_selected_at_the_last_iteration_is_scored_once(project, monkeypatch):
    """The selected checkpoint is the last iterate when the last scores best: the evaluation reuses the
    last's confusion matrix instead of scoring the same weights twice; any other weights are scored."""
    monkeypatch.chdir(project)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    torch.set_num_threads(1)
    fresh("warmup")
    params = params_with({**SELECT, "every": 6})          # one selection: at the last iteration
    train(params, "warmup")
    best_file = Path("data/models/warmup/best") / MODEL_FILE
    assert json.loads(Path("data/models/warmup/meta.json").read_text())["selection"]["best_iteration"] == 6
    params["evaluate"] = {"models": params["models"], "targets": ["cs"], "split": "val", "batch_size": 2,
                          "workers": 0, "panels": 0}
    Path("params.yaml").write_text(yaml.safe_dump(params))
    scored = []
    real = evaluation.split_matrix
    monkeypatch.setattr(evaluation, "split_matrix", lambda *a, **k: scored.append(k.get("desc")) or real(*a, **k))
    evaluate_stage(["warmup", "cs"])
    report = json.loads(Path("metrics/eval/warmup/cs.json").read_text())
    assert scored == ["evaluate warmup on cs"]
    assert report["best"]["iteration"] == 6 and report["best"]["mIoU"] == report["mIoU"]

    payload = torch.load(best_file, weights_only=True)      # one weight moved: scored on its own
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] + 1e-3
    torch.save(payload, best_file)
    scored.clear()
    evaluate_stage(["warmup", "cs"])
    assert scored == ["evaluate warmup on cs", "evaluate warmup/best on cs"]


def test_same_model_compares_weights_buffers_and_what_the_inputs_go_through():
    a, b = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    b.load_state_dict(a.state_dict())
    meta = {"model": {"arch": "x"}, "class_set": "cityscapes19", "normalize": {"mean": [0.5] * 3, "std": [0.2] * 3}}
    assert evaluation.same_model(a, meta, b, dict(meta))
    assert not evaluation.same_model(a, meta, b, {**meta, "normalize": {"mean": [0.4] * 3, "std": [0.2] * 3}})
    assert not evaluation.same_model(a, {**meta, "kind": "ensemble"}, b, {**meta, "kind": "ensemble"})
    b[1].running_mean += 1e-6                                  # a buffer differs
    assert not evaluation.same_model(a, meta, b, meta)
