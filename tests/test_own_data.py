"""The user's own data with no code: tables (CSV, Parquet) and image folders, class and sample
weights, predictions by name, and every bad input as one line with no run created."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import ROOT, experiment_runs, fit_in_own_store, store_uri
from mlplab.data import ImageFolderDataModule, TableDataModule
from mlplab.data.examples import write_examples
from mlplab.errors import DatasetError
from mlplab.main import main
from mlplab.tracking.server import free_port
from my_project.models import MLP, Classifier, Regressor

EXAMPLES = ROOT / "configs" / "examples"


def people(n: int = 120, seed: int = 0) -> pd.DataFrame:
    """A table with numbers, a text category, an integer category and a text label."""
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(18, 80, n).astype(float),
            "income": rng.normal(50, 10, n),
            "city": rng.choice(["oslo", "rome", "lima"], n),
            "floor": rng.integers(0, 3, n),
        }
    )
    frame["label"] = np.where(frame["income"] + (frame["city"] == "rome") * 8 > 52, "yes", "no")
    return frame


def table(tmp_path: Path, frame: pd.DataFrame, name: str = "t.csv") -> str:
    path = tmp_path / name
    frame.to_parquet(path) if path.suffix == ".parquet" else frame.to_csv(path, index=False)
    return str(path)


# --- tables -------------------------------------------------------------------------------------
def test_csv_classification_encodes_categories_and_keeps_label_names(tmp_path):
    dm = TableDataModule(
        path=table(tmp_path, people()), target="label", categorical=["city", "floor"]
    )
    assert dm.num_features == 1 + 1 + 3 + 3 and dm.num_classes == 2
    assert dm.class_names == ["no", "yes"] and not hasattr(dm, "num_targets")
    assert dm.encoding.input_names == [
        "age", "income", "city=lima", "city=oslo", "city=rome", "floor=0", "floor=1", "floor=2",
    ]  # fmt: skip
    x, y = dm.data["train"]
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape == (96, 8)
    assert torch.equal(x[:, 2:5].sum(1), torch.ones(96))  # one category per row
    assert {k: len(v[0]) for k, v in dm.data.items()} == {"train": 96, "val": 24}
    # the one-hot inputs are not standardised
    mean, std = dm.feature_stats()
    assert mean[2:].abs().sum() == 0 and (std[2:] == 1).all() and std[1] > 5


def test_parquet_multi_output_regression(tmp_path):
    frame = people().drop(columns=["label", "city"])
    frame["y1"], frame["y2"] = frame["age"] * 0.5, frame["income"] - 1
    dm = TableDataModule(path=table(tmp_path, frame, "t.parquet"), target=["y1", "y2"])
    assert dm.num_targets == 2 and dm.num_features == 3 and not hasattr(dm, "num_classes")
    assert dm.target_names == ["y1", "y2"]
    x, y = dm.data["train"]
    assert y.dtype == torch.float32 and y.shape == (96, 2)
    assert torch.allclose(y[:, 0], x[:, 0] * 0.5)


def test_fraction_splits_are_seeded_and_stratified(tmp_path):
    path = table(tmp_path, people(200))

    def rows(seed):
        dm = TableDataModule(path=path, target="label", categorical=["city"], features=["age",
                             "city"], test_fraction=0.25, seed=seed)  # fmt: skip
        return {k: v[0][:, 0].tolist() for k, v in dm.loaded().items()}, dm

    first, dm = rows(1)
    assert rows(1)[0] == first and rows(2)[0] != first
    assert {k: len(v) for k, v in first.items()} == {"train": 110, "val": 40, "test": 50}
    labels = people(200)["label"]
    share = (labels == "yes").mean()
    for split in ("val", "test"):
        assert dm.data[split][1].float().mean().item() == pytest.approx(share, abs=0.03)


def test_a_split_column_and_separate_files(tmp_path):
    frame = people()
    frame["part"] = ["train"] * 80 + ["validation"] * 20 + ["test"] * 20
    dm = TableDataModule(path=table(tmp_path, frame), target="label", split_column="part",
                         categorical=["city"])  # fmt: skip
    assert {k: len(v[0]) for k, v in dm.loaded().items()} == {"train": 80, "val": 20, "test": 20}
    assert dm.encoding.columns == ["age", "income", "city", "floor"]  # not the split column
    files = {s: table(tmp_path, frame[frame.part == p].drop(columns="part"), f"{s}.csv")
             for s, p in (("train", "train"), ("val", "validation"), ("test", "test"))}  # fmt: skip
    dm = TableDataModule(train_path=files["train"], val_path=files["val"],
                         test_path=files["test"], target="label", categorical=["city"])  # fmt: skip
    assert {k: len(v[0]) for k, v in dm.loaded().items()} == {"train": 80, "val": 20, "test": 20}


def test_missing_values_are_refused_or_imputed_and_unseen_categories_are_zero(tmp_path):
    frame = people()
    frame.loc[[3, 7], "income"] = np.nan
    path = table(tmp_path, frame)
    with pytest.raises(DatasetError, match="column 'income' has 2 missing value"):
        TableDataModule(path=path, target="label", categorical=["city"]).loaded()
    dm = TableDataModule(path=path, target="label", categorical=["city"], impute="median")
    x = dm.loaded()["train"][0]
    assert torch.isfinite(x).all()
    fill = dm.encoding.features[1]["fill"]
    train = dm.split_rows(120, frame["label"].to_numpy())["train"]  # stratified by label
    assert fill == pytest.approx(frame.iloc[train]["income"].median())
    unseen = dm.encoding.encode(pd.DataFrame({"age": [30.0], "income": [None], "city": ["nuuk"],
                                              "floor": [1]}))  # fmt: skip
    assert unseen.tolist() == [[30.0, np.float32(fill), 0.0, 0.0, 0.0, 1.0]]


BAD_TABLES = {
    "missing file": ({"path": "nope.csv", "target": "label"}, "nope.csv does not exist"),
    "empty file": ({"path": "empty.csv", "target": "label"}, "empty.csv is empty"),
    "unreadable": ({"path": "binary.csv", "target": "label"}, "cannot be read as a table"),
    "unknown format": ({"path": "t.xyz", "target": "label"}, "cannot tell the format"),
    "absent target": ({"target": "price"}, "data.target names 'price', not a column of the file; "
                      "its columns are 'age', 'income', 'city', 'floor', 'label'"),
    "undeclared text": ({"target": "label"}, "feature column 'city' holds text ('"),
    "one class": ({"target": "one", "features": ["age"]}, "target 'one' has one class"),
    "regression data": ({"target": "income", "features": ["age"]}, "has no num_classes"),
    "fraction": ({"target": "label", "val_fraction": 1.5}, "data.val_fraction is 1.5"),
    "fractions sum": ({"target": "label", "val_fraction": 0.5, "test_fraction": 0.5},
                      "their sum must be below 1"),
    # values that are no float32, named by their cell, not blamed on the learning rate later
    "overflow": ({"path": "big.csv", "target": "label", "features": ["age", "income"]},
                 "column 'income' is not a finite float32 at data row 8 (1e+300)"),
    "infinity": ({"path": "inf.csv", "target": "label", "features": ["age", "income"]},
                 "column 'income' is not a finite float32 at data row 8 (inf)"),
    "2,000,000 digits": ({"path": "digits.csv", "target": "label", "features": ["income"]},
                         "column 'income' is not a finite float32 at data row 8"),
    "one bad cell": ({"path": "oops.csv", "target": "label", "features": ["age", "income"]},
                     "feature column 'age' holds text ('oops', data row 5)"),
    "null target": ({"path": "nulls.parquet", "target": "label", "features": ["age"]},
                    "nulls.parquet: target column 'label' has 1 missing value(s) (data rows 4)"),
    "null feature": ({"path": "nulls.parquet", "target": "floor", "features": ["income"]},
                     "column 'income' has 1 missing value(s)"),
    "dates": ({"path": "dates.parquet", "target": "label", "features": ["age", "when"]},
              "feature column 'when' holds dates or times (datetime64"),
    "lists": ({"path": "lists.parquet", "target": "label", "features": ["age", "tags"]},
              "feature column 'tags' holds lists or records"),
    "target as feature": ({"target": "label", "features": ["age", "label"]},
                          "data.features lists the target 'label'"),
    "duplicated header": ({"path": "dup.csv", "target": "label"},
                          "dup.csv: duplicated column name 'a' (columns 1 and 3); rename one"),
    "gzip as .csv": ({"path": "packed.csv", "target": "label"},
                     "packed.csv holds gzip data: name it packed.csv.gz"),
    "a folder": ({"path": "folder.csv", "target": "label"}, "folder.csv is a folder; a table"),
}  # fmt: skip


@pytest.fixture
def bad_files(tmp_path):
    frame = people()
    frame["one"] = 1
    table(tmp_path, frame)
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "binary.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 50)
    (tmp_path / "t.xyz").write_text("a,b\n1,2\n")
    for name, column, cell in (("big.csv", "income", "1e300"), ("inf.csv", "income", "inf"),
                               ("digits.csv", "income", "1" * 2_000_000),
                               ("oops.csv", "age", "oops")):  # fmt: skip
        changed = frame.astype({column: object})
        changed.loc[7 if column == "income" else 4, column] = cell
        table(tmp_path, changed, name)
    nulls = frame.astype({"label": object, "income": object})
    nulls.loc[3, "label"], nulls.loc[5, "income"] = None, None
    table(tmp_path, nulls, "nulls.parquet")
    table(tmp_path, frame.assign(when=pd.date_range("2020-01-01", periods=len(frame))),
          "dates.parquet")  # fmt: skip
    table(tmp_path, frame.assign(tags=[[1, 2]] * len(frame)), "lists.parquet")
    (tmp_path / "dup.csv").write_text("a,b,a,label\n" + "".join(f"{i},{i},{i},{i % 2}\n"
                                                             for i in range(20)))  # fmt: skip
    (tmp_path / "packed.csv").write_bytes(gzip.compress((tmp_path / "t.csv").read_bytes()))
    (tmp_path / "folder.csv").mkdir()
    return tmp_path


@pytest.mark.parametrize("case", BAD_TABLES, ids=str)
def test_a_bad_table_is_one_line_exit_2_and_no_run(case, bad_files, store, capsys):
    settings, message = BAD_TABLES[case]
    args = {"path": "t.csv", **settings}
    flags = [f"--data.{k}={json.dumps(v) if isinstance(v, list) else v}" for k, v in args.items()]
    with pytest.raises(SystemExit) as done:
        main(["fit", "--data", "mlplab.data.TableDataModule", *flags,
              "--model", "my_project.models.Classifier", "--model.net", "my_project.models.MLP",
              "--experiment_name", "bad"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2
    assert err[-1].startswith("mlplab: error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert experiment_runs(store, "bad")[1] == []


# --- image folders ------------------------------------------------------------------------------
def image_folder(root: Path, per_class: int = 8, size=(12, 10), mode: str = "L") -> Path:
    """Two classes told apart by brightness, images of a size other than the configured one."""
    rng = np.random.default_rng(0)
    for label, level in (("dark", 40), ("light", 210)):
        (root / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = size[::-1] + ((3,) if mode == "RGB" else ())
            pixels = np.clip(rng.normal(level, 10, shape), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, mode=mode).save(
                root / label / f"{i}.{'png' if i % 2 else 'jpg'}"
            )
    return root


@pytest.mark.parametrize("grayscale, mode", [(True, "L"), (False, "RGB"), (True, "RGB")])
def test_image_folder_decodes_resizes_and_splits(tmp_path, grayscale, mode):
    root = image_folder(tmp_path / "imgs", mode=mode)
    dm = ImageFolderDataModule(path=str(root), image_size=8, grayscale=grayscale,
                               val_fraction=0.25, seed=3)  # fmt: skip
    channels = 1 if grayscale else 3
    assert dm.num_features == channels * 64 and dm.class_names == ["dark", "light"]
    data = dm.loaded()
    assert {k: len(v[0]) for k, v in data.items()} == {"train": 12, "val": 4}
    x, y = data["train"]
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.equal(x.mean(1) > 0.5, y.bool())  # light images are the light class
    assert torch.bincount(data["val"][1]).tolist() == [2, 2]  # stratified
    again = ImageFolderDataModule(path=str(root), image_size=8, grayscale=grayscale,
                                  val_fraction=0.25, seed=3).loaded()  # fmt: skip
    assert torch.equal(again["val"][0], data["val"][0])


def test_image_folders_per_split(tmp_path):
    train = image_folder(tmp_path / "train")
    val = image_folder(tmp_path / "val", per_class=2)
    dm = ImageFolderDataModule(train_path=str(train), val_path=str(val), image_size=[6, 5])
    data = dm.loaded()
    assert {k: len(v[0]) for k, v in data.items()} == {"train": 16, "val": 4}
    assert dm.image_shape == (6, 5) and dm.num_features == 30


def test_bad_image_folders_are_one_line(tmp_path):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.png").write_bytes(b"")
    with pytest.raises(DatasetError, match="has no class subfolders; lay the images out as"):
        ImageFolderDataModule(path=str(tmp_path / "flat")).loaded()
    root = image_folder(tmp_path / "imgs")
    (root / "dark" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"broken.png is not a readable image .*remove or"):
        ImageFolderDataModule(path=str(root)).loaded()
    with pytest.raises(DatasetError, match="data.test_fraction is 0"):
        ImageFolderDataModule(path=str(root), test_fraction=0)


def bad_image_folder(root: Path, case: str) -> Path:
    """An image folder with one flaw; returns the path to give as data.path."""
    image_folder(root)
    if case == "truncated png":
        whole = (root / "dark" / "1.png").read_bytes()
        (root / "dark" / "1.png").write_bytes(whole[: len(whole) // 2])
    elif case == "text named .png":
        (root / "light" / "notes.png").write_text("not an image")
    elif case == "empty class folder":
        (root / "empty").mkdir()
    elif case == "folder link up":
        (root / "dark" / "up").symlink_to("..")
    elif case == "folder link sideways":
        (root / "dark" / "sideways").symlink_to("../light")
    elif case == "one file twice":
        (root / "dark" / "again.png").symlink_to(root / "light" / "1.png")
    elif case == "a file as the folder":
        return root / "dark" / "1.png"
    return root


BAD_IMAGES = {
    "truncated png": "1.png is not a readable image (",
    "text named .png": "notes.png is not a readable image (",
    "empty class folder": "Found no valid file for the classes empty",
    "folder link up": "dark/up links to the folder ..; links to folders inside an image folder",
    "folder link sideways": "dark/sideways links to the folder ../light; links to folders",
    "one file twice": "light/1.png are the same image file; remove one of them",
    "a file as the folder": "1.png is a file; give the folder that holds the class folders",
}


@pytest.mark.parametrize("case", BAD_IMAGES, ids=str)
def test_a_bad_image_folder_is_one_line_exit_2_and_no_run(case, tmp_path, store, capsys):
    path = bad_image_folder(tmp_path / "imgs", case)
    with pytest.raises(SystemExit) as done:
        main(["fit", "--data", "mlplab.data.ImageFolderDataModule", f"--data.path={path}",
              "--data.image_size=8", "--model", "my_project.models.Classifier",
              "--model.net", "my_project.models.MLP", "--experiment_name", "bad"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2
    assert err[-1].startswith("mlplab: error: ") and BAD_IMAGES[case] in err[-1], err
    assert not any("Traceback" in line for line in err)
    assert experiment_runs(store, "bad")[1] == []


def test_each_image_file_is_one_sample_in_one_split(tmp_path):
    """Files linked in from elsewhere count once each; the splits are disjoint by the file
    each path resolves to, and the samples are the distinct files."""
    elsewhere = image_folder(tmp_path / "elsewhere", per_class=5)
    root = image_folder(tmp_path / "imgs", per_class=5)
    for label in ("dark", "light"):
        for i, image in enumerate(sorted((elsewhere / label).iterdir())):
            (root / label / f"linked{i}{image.suffix}").symlink_to(image)
    dm = ImageFolderDataModule(path=str(root), image_size=8, val_fraction=0.2,
                               test_fraction=0.2)  # fmt: skip
    assert dm.num_classes == 2
    real = {split: {os.path.realpath(p) for p in paths} for split, paths in dm.paths.items()}
    assert sum(len(r) for r in real.values()) == sum(len(p) for p in dm.paths.values()) == 20
    assert not (real["train"] & real["val"] or real["train"] & real["test"]
                or real["val"] & real["test"])  # fmt: skip
    assert sum(len(x) for x, _ in dm.loaded().values()) == 20


# --- weights ------------------------------------------------------------------------------------
def test_class_weights_scale_each_training_samples_loss_as_keras_does():
    logits, y = torch.randn(6, 3), torch.tensor([0, 1, 2, 2, 1, 0])
    task = Classifier(MLP, num_features=4, num_classes=3, class_weight=[1.0, 3.0, 0.5])
    per_sample = torch.nn.functional.cross_entropy(logits, y, reduction="none")
    by_hand = (per_sample * torch.tensor([1.0, 3.0, 0.5])[y]).sum() / 6
    weights = task.sample_weights(y, None, "train")
    assert task.loss(logits, y, weights).item() == pytest.approx(by_hand.item())
    assert task.sample_weights(y, None, "val") is None  # validation loss stays unweighted
    rows = torch.tensor([2.0, 1, 1, 0, 1, 1])  # a weight column multiplies in
    assert task.loss(logits, y, task.sample_weights(y, rows, "train")).item() == pytest.approx(
        (per_sample * torch.tensor([1.0, 3.0, 0.5])[y] * rows).sum().item() / 6
    )
    binary = Classifier(MLP, num_features=4, num_classes=2, class_weight=[1.0, 4.0])
    z, t = torch.randn(4, 1), torch.tensor([0, 1, 1, 0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z[:, 0], t.float(), reduction="none")
    assert binary.loss(z, t, binary.sample_weights(t, None, "train")).item() == pytest.approx(
        (bce * torch.tensor([1.0, 4.0, 4.0, 1.0])).mean().item()
    )
    regressor = Regressor(MLP, num_features=2, num_targets=2)
    out, target, w = torch.randn(3, 2), torch.randn(3, 2), torch.tensor([0.0, 1.0, 2.0])
    squares = ((out - target) ** 2).mean(1)
    assert regressor.loss(out, target, w).item() == pytest.approx((squares * w).mean().item())


def test_balanced_weights_and_a_weight_column_train_and_are_params(tmp_path, store):
    frame = people(150)
    frame["w"] = np.where(frame["label"] == "yes", 2.0, 1.0)
    path = table(tmp_path, frame)
    main(["fit", "--data", "mlplab.data.TableDataModule", f"--data.path={path}",
          "--data.target=label", "--data.categorical=[city]", "--data.weight_column=w",
          "--model", "my_project.models.Classifier", "--model.net", "my_project.models.MLP",
          "--model.class_weight=balanced", "--trainer.max_epochs=2",
          "--experiment_name", "weights", "--log_system_metrics=false"])  # fmt: skip
    _, (run,) = experiment_runs(store, "weights")
    labels = frame["label"].iloc[np.sort(TableDataModule(path=path, target="label",
                                 categorical=["city"]).split_rows(150, frame["label"].to_numpy())
                                 ["train"])]  # fmt: skip
    counts = labels.value_counts()
    for name in ("no", "yes"):
        expected = len(labels) / (2 * counts[name])
        assert float(run.data.params[f"model.class_weight.{name}"]) == pytest.approx(expected)
    assert run.data.params["data.weight_column"] == "w" and run.info.status == "FINISHED"


def test_a_class_weight_list_of_the_wrong_length_is_one_line(tmp_path, store, capsys):
    path = table(tmp_path, people())
    with pytest.raises(SystemExit) as done:
        main(["fit", "--data", "mlplab.data.TableDataModule", f"--data.path={path}",
              "--data.target=label", "--data.categorical=[city]", "--model",
              "my_project.models.Classifier", "--model.net", "my_project.models.MLP",
              "--model.class_weight=[1, 2, 3]", "--experiment_name", "bad"])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and "class_weight has 3 weights but the data has 2" in err[-1]
    assert experiment_runs(store, "bad")[1] == []


# --- the example configs, predictions, serving --------------------------------------------------
@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """The three example configs trained in one store on the data `make examples` writes."""
    folder = tmp_path_factory.mktemp("examples")
    write_examples(folder)
    for name in ("wine", "diabetes", "digits_folder"):
        fit_in_own_store(folder, "--config", str(EXAMPLES / f"{name}.yaml"),
                         "--log_system_metrics=false")  # fmt: skip
    return folder


@pytest.mark.parametrize(
    "name, metric, floor",
    [("wine", "test/acc", 0.95), ("diabetes", "test/r2", 0.3), ("digits_folder", "test/acc", 0.95)],
)
def test_example_configs_reach_their_stated_figures(examples, name, metric, floor):
    _, (run,) = experiment_runs(store_uri(examples), name)
    assert run.data.metrics[metric] >= floor, run.data.metrics


@pytest.mark.parametrize("name, target", [("wine", "cultivar"), ("diabetes", "progression")])
def test_the_table_model_takes_raw_rows_and_matches_the_checkpoint(examples, name, target):
    _, (run,) = experiment_runs(store_uri(examples), name)
    mlflow.set_tracking_uri(store_uri(examples))
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    source = examples / "data" / "examples" / ("wine.csv" if name == "wine" else "diabetes.parquet")
    rows = (pd.read_csv(source) if name == "wine" else pd.read_parquet(source)).drop(columns=target)
    served = model.predict(rows.sample(20, random_state=0))
    assert [c.name for c in model.metadata.get_input_schema().inputs] == list(rows.columns)
    best = next((examples / "mlruns" / name / run.info.run_id / "checkpoints").glob("best-*.ckpt"))
    rows.sample(20, random_state=0).to_csv(examples / "rows.csv", index=False)
    main(["predict", "--model", str(best), "--input", str(examples / "rows.csv"),
          "--output", str(examples / "out.csv")])  # fmt: skip
    from_checkpoint = pd.read_csv(examples / "out.csv")
    assert list(served.columns) == list(from_checkpoint.columns)
    numbers = served.select_dtypes("number").columns
    np.testing.assert_allclose(served[numbers], from_checkpoint[numbers], rtol=1e-4, atol=1e-5)
    if name == "wine":
        assert list(served.columns) == ["predicted", "prob_class_0", "prob_class_1", "prob_class_2"]
        assert (served["predicted"].to_numpy() == from_checkpoint["predicted"].to_numpy()).all()
        truth = pd.read_csv(source)["cultivar"].sample(20, random_state=0)
        assert (served["predicted"].to_numpy() == truth.to_numpy()).mean() >= 0.9
    else:
        assert list(served.columns) == ["progression"]


@pytest.mark.parametrize("model", ["logged", "checkpoint"])
def test_predict_names_the_columns_a_table_lacks(examples, model, capsys, monkeypatch):
    """From the logged model as from the checkpoint: the column's name, not MLflow's cut-off
    dump of the rows."""
    _, (run,) = experiment_runs(store_uri(examples), "wine")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(examples))
    rows = pd.read_csv(examples / "data" / "examples" / "wine.csv").drop(columns=["cultivar"])
    rows.drop(columns=["alcohol", "hue"]).head(3).to_csv(examples / "short.csv", index=False)
    ref = (f"runs:/{run.info.run_id}/model" if model == "logged" else
           str(next((examples / "mlruns" / "wine" / run.info.run_id).rglob("best-*.ckpt"))))
    with pytest.raises(SystemExit) as done:
        main(["predict", "--model", ref, "--input", str(examples / "short.csv")])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1, err
    assert "short.csv: missing column(s) 'alcohol', 'hue'; the model takes 'alcohol'" in err[0]


def test_predict_names_the_image_folders_classes(examples, capsys, monkeypatch):
    _, (run,) = experiment_runs(store_uri(examples), "digits_folder")
    pixels = np.asarray(Image.open(examples / "data/examples/digits/7/0007.png"), np.float32)
    np.save(examples / "seven.npy", (pixels / 255).reshape(1, -1))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri(examples))
    main(["predict", "--model", f"runs:/{run.info.run_id}/model", "--input",
          str(examples / "seven.npy")])  # fmt: skip
    header, row = capsys.readouterr().out.strip().splitlines()
    assert header == "predicted," + ",".join(f"prob_{d}" for d in range(10))
    assert row.startswith("7,")


def test_mlflow_models_serve_takes_named_columns_and_answers_class_names(examples):
    _, (run,) = experiment_runs(store_uri(examples), "wine")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run.info.run_id}/model",
         "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env={**os.environ, "MLFLOW_TRACKING_URI": store_uri(examples),  # uvicorn on PATH
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    rows = pd.read_csv(examples / "data/examples/wine.csv").iloc[[0, 70, 170]]
    features = rows.drop(columns="cultivar")
    try:
        bodies = {
            "application/json": json.dumps({"dataframe_split": features.to_dict("split")}),
            "text/csv": features.to_csv(index=False),
        }
        for content_type, body in bodies.items():
            answer = post(f"http://127.0.0.1:{port}/invocations", body, content_type)
            predicted = [p["predicted"] for p in answer["predictions"]]
            assert predicted == rows["cultivar"].tolist(), answer
    finally:
        server.terminate()
        server.wait(timeout=30)


def post(url: str, body: str, content_type: str, wait: float = 90) -> dict:
    deadline = time.monotonic() + wait
    while True:
        request = urllib.request.Request(url, body.encode(), {"Content-Type": content_type})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return json.loads(response.read())
        except (ConnectionError, urllib.error.URLError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# --- code of one's own --------------------------------------------------------------------------
def test_a_datamodule_in_the_working_directory_imports_with_the_console_script(tmp_path):
    """One subclass plus one YAML, run by `mlplab fit` from the folder that holds them."""
    (tmp_path / "my_data.py").write_text(
        "import torch\nfrom mlplab.data import ArrayDataModule\n\n\n"
        "class Squares(ArrayDataModule):\n    num_features, num_classes = 1, 2\n\n"
        "    def load_splits(self):\n        x = torch.linspace(-1, 1, 64).unsqueeze(1)\n"
        "        return {'train': (x, (x[:, 0] > 0).long()), 'val': (x, (x[:, 0] > 0).long())}\n"
    )
    (tmp_path / "my.yaml").write_text(
        "trainer: {max_epochs: 2}\ndata: {class_path: my_data.Squares}\n"
        "model: {class_path: my_project.models.Classifier,"
        " init_args: {net: my_project.models.MLP}}\n"
    )
    script = Path(sys.executable).parent / "mlplab"
    done = subprocess.run([str(script), "fit", "--config", "my.yaml", "--log_system_metrics",
                           "false"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ,
                               "MLFLOW_TRACKING_URI": store_uri(tmp_path)})  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    _, (run,) = experiment_runs(store_uri(tmp_path), "my")
    assert run.info.status == "FINISHED" and "val/acc" in run.data.metrics


def test_the_base_datamodule_is_refused_without_a_traceback(store, capsys):
    with pytest.raises(SystemExit) as done:
        main(
            [
                "fit",
                "--data",
                "mlplab.data.ArrayDataModule",
                "--model",
                "my_project.models.Classifier",
            ]
        )
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err and "is abstract" in err
