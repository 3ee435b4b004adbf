"""Generated malformed tables and image folders (a seeded generator of flaws, a few hundred
cases): each either loads with every written row or distinct image counted once, in one split,
with finite inputs, or is refused with one line that names the file. Never an exception of
another kind (which the CLI would show as a traceback), never a silently wrong count.

A sample of the refused cases goes through `mlplab fit` as real processes (forked from one
that imported everything): exit 2, one line, and no run in the store."""

from __future__ import annotations

import gzip
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import experiment_runs
from mlplab.data import ImageFolderDataModule, TableDataModule
from mlplab.errors import DatasetError

CELLS = ["oops", "", "inf", "-inf", "nan", "1e300", "1e39", "9" * 400, " 3 ", "NULL", "1_000",
         "0x10", "--1", "1e-50", "TRUE", "é", "\t"]  # fmt: skip


def table_case(rng: random.Random, folder: Path) -> tuple[dict, int | None, list[str]]:
    """A table file with up to three flaws: (the datamodule's settings, the rows written where
    every row must load, the flaws)."""
    n = rng.randint(6, 40)
    frame = pd.DataFrame({
        "a": [rng.uniform(-5, 5) for _ in range(n)],
        "b": [rng.randint(0, 9) for _ in range(n)],
        "colour": [rng.choice(["red", "green", "blue"]) for _ in range(n)],
        "label": [rng.choice(["yes", "no"]) for _ in range(n)],
    })  # fmt: skip
    frame.loc[0, "label"], frame.loc[1, "label"] = "yes", "no"  # two classes, unless a flaw
    flaws = rng.sample(["cell", "cell", "null label", "one class", "header twice", "no rows",
                        "list column", "date column", "target as feature", "undeclared text",
                        "wrong target"], k=rng.randint(0, 3))  # fmt: skip
    settings = {"target": "label", "categorical": ["colour"], "val_fraction": 0.25}
    for flaw in flaws:
        if flaw == "cell":
            column = rng.choice(["a", "b"])
            frame[column] = frame[column].astype(object)
            frame.loc[rng.randrange(n), column] = rng.choice(CELLS)
        elif flaw == "null label":
            frame.loc[rng.randrange(n), "label"] = None
        elif flaw == "one class":
            frame["label"] = "yes"
        elif flaw == "no rows":
            frame = frame.iloc[:0]
        elif flaw == "list column":
            frame["tags"] = [[1, 2]] * len(frame)
        elif flaw == "date column":
            frame["when"] = pd.Timestamp("2020-01-01")
        elif flaw == "target as feature":
            settings["features"] = ["a", "label"]
        elif flaw == "undeclared text":
            settings["categorical"] = []
        elif flaw == "wrong target":
            settings["target"] = "price"
    form = rng.choice(["csv", "tsv", "parquet", "csv.gz", "gzip named csv", "truncated csv",
                       "random bytes"])  # fmt: skip
    if "list column" in flaws or "date column" in flaws:  # no CSV holds them as such
        form = "parquet"
    names = {"tsv": "t.tsv", "parquet": "t.parquet", "csv.gz": "t.csv.gz"}
    path = folder / names.get(form, "t.csv")
    if form == "parquet":
        for column in ("a", "b"):  # a cell of text makes the column text, as in a CSV
            if frame[column].dtype == object:
                frame[column] = frame[column].map(lambda v: v if v is None else str(v))
        frame.to_parquet(path)
    elif form == "tsv":
        frame.to_csv(path, sep="\t", index=False)
    else:
        text = frame.to_csv(index=False)
        if "header twice" in flaws:
            head, _, rest = text.partition("\n")
            text = f"{head},a\n" + "".join(f"{line},0\n" for line in rest.splitlines())
        data = text.encode()
        if form == "truncated csv":
            data = data[: rng.randrange(1, len(data))]
        elif form == "random bytes":
            data = bytes(rng.randrange(256) for _ in range(rng.randint(0, 300)))
        path.write_bytes(gzip.compress(data) if "gz" in form else data)
    exact = form not in ("truncated csv", "random bytes")  # else: any count the file holds
    return {"path": str(path), **settings}, len(frame) if exact else None, [form, *flaws]


def check_table(settings: dict, rows: int | None, what: list[str]) -> None:
    try:
        data = TableDataModule(**settings).loaded()
    except DatasetError as err:
        message = str(err)
        assert message and "\n" not in message, (what, message)
        assert Path(settings["path"]).name in message or "data." in message, (what, message)
        return
    counts = sum(len(split[0]) for split in data.values())
    if rows is not None:
        assert counts == rows, (what, counts, rows)
    for x, y, *_ in data.values():
        assert len(x) == len(y) and torch.isfinite(x).all(), what
        assert y.min() >= 0 and y.max() <= 1, what


@pytest.mark.parametrize("chunk", range(4))
def test_generated_tables_load_whole_or_are_refused_in_one_line(tmp_path, chunk):
    for seed in range(chunk * 60, chunk * 60 + 60):
        folder = tmp_path / str(seed)
        folder.mkdir()
        settings, rows, flaws = table_case(random.Random(seed), folder)
        check_table(settings, rows, [f"seed {seed}", *flaws])


def image_case(rng: random.Random, root: Path) -> tuple[dict, list[str]]:
    """An image folder with up to three flaws: (the datamodule's settings, the flaws)."""
    (root / "data").mkdir(parents=True)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    classes = [f"c{i}" for i in range(rng.randint(2, 3))]
    for name in classes:
        (root / "data" / name).mkdir()
        for i in range(rng.randint(3, 6)):
            size = (rng.randint(2, 9), rng.randint(2, 9))
            pixels = np.full((*size[::-1], 3), rng.randrange(256), dtype=np.uint8)
            image = Image.fromarray(pixels, "RGB").convert(rng.choice(["L", "RGB", "RGBA", "P"]))
            kind = rng.choice(["png", "bmp"] + (["jpg"] if image.mode in ("L", "RGB") else []))
            image.save(root / "data" / name / f"{i}.{kind}")
    flaws = rng.sample(["truncated", "text as png", "empty png", "empty class", "link up",
                        "link sideways", "same file twice", "linked from elsewhere",
                        "nested folder", "other files"], k=rng.randint(0, 3))  # fmt: skip
    first = root / "data" / classes[0]
    for flaw in flaws:
        if flaw == "truncated":
            victim = sorted(first.glob("*.png")) or sorted(first.glob("*.bmp"))
            if victim:
                data = victim[0].read_bytes()
                victim[0].write_bytes(data[: len(data) // 2])
        elif flaw == "text as png":
            (first / "notes.png").write_text("not an image")
        elif flaw == "empty png":
            (first / "zero.png").write_bytes(b"")
        elif flaw == "empty class":
            (root / "data" / "zz_empty").mkdir(exist_ok=True)
        elif flaw == "link up":
            (first / "up").symlink_to("..")
        elif flaw == "link sideways":
            (first / "sideways").symlink_to(f"../{classes[1]}")
        elif flaw == "same file twice":
            (first / "twice.png").symlink_to(next((root / "data" / classes[1]).iterdir()))
        elif flaw == "linked from elsewhere":  # a distinct file: one more sample, not a flaw
            Image.new("L", (3, 3), 128).save(elsewhere / "outside.png")
            (first / "outside.png").symlink_to(elsewhere / "outside.png")
        elif flaw == "nested folder":  # torchvision takes images in subfolders of a class
            (first / "more").mkdir()
            Image.new("L", (3, 3), 7).save(first / "more" / "deep.png")
        elif flaw == "other files":  # not images by their extension: left out
            (first / "README.txt").write_text("notes")
            (first / ".hidden").write_bytes(b"\x00")
    return {"path": str(root / "data"), "image_size": 4, "val_fraction": 0.2,
            "test_fraction": rng.choice([None, 0.2])}, flaws  # fmt: skip


def expected_images(root: Path) -> int:
    """What a careful count finds: files with an image extension, reached without following
    folder links, each real file once."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    found = set()
    for folder, _, names in os.walk(root):
        for name in names:
            if name.lower().endswith(IMG_EXTENSIONS):
                found.add(os.path.realpath(Path(folder) / name))
    return len(found)


def test_generated_image_folders_count_each_file_once_or_are_refused_in_one_line(tmp_path):
    for seed in range(120):
        rng = random.Random(seed)
        settings, flaws = image_case(rng, tmp_path / str(seed))
        what = [f"seed {seed}", *flaws]
        module = ImageFolderDataModule(**settings)
        try:
            data = module.loaded()
        except DatasetError as err:
            assert str(err) and "\n" not in str(err), (what, str(err))
            continue
        assert not {"truncated", "text as png", "empty png", "empty class", "link up",
                    "link sideways", "same file twice"} & set(flaws), what  # fmt: skip
        counts = sum(len(x) for x, _ in data.values())
        assert counts == expected_images(Path(settings["path"])), (what, counts)
        real = [{os.path.realpath(p) for p in paths} for paths in module.paths.values()]
        assert sum(map(len, real)) == counts, what  # none twice
        assert len(set().union(*real)) == counts, what  # none in two splits
        for x, _ in data.values():
            assert torch.isfinite(x).all() and x.shape[1] == 16, what


def refused(module) -> bool:
    try:
        module.loaded()
    except DatasetError:
        return True
    return False


def test_refused_cases_stop_mlplab_fit_with_one_line_and_no_run(cli, tmp_path):
    """The first 8 refused tables and 4 refused image folders of the generator, as `mlplab
    fit` meets them."""
    cases = []
    for seed in range(200):
        folder = tmp_path / f"t{seed}"
        folder.mkdir()
        settings, _, flaws = table_case(random.Random(seed), folder)
        if refused(TableDataModule(**settings)):
            cases.append((folder, "mlplab.data.TableDataModule", settings, flaws))
        if len(cases) == 8:
            break
    for seed in range(200):
        settings, flaws = image_case(random.Random(seed), tmp_path / f"i{seed}")
        if refused(ImageFolderDataModule(**settings)):
            cases.append((tmp_path / f"i{seed}", "mlplab.data.ImageFolderDataModule", settings,
                          flaws))  # fmt: skip
        if len(cases) == 12:
            break
    assert len(cases) == 12
    for folder, data, settings, flaws in cases:
        flags = [f"--data.{k}={v}" for k, v in settings.items() if v is not None]
        store = f"sqlite:///{folder}/mlruns/mlflow.db"
        done = cli.run(["fit", "--data", data, *flags, "--model", "my_project.models.Classifier",
                        "--model.net", "my_project.models.MLP", "--experiment_name", "bad"],
                       folder, {"MLFLOW_TRACKING_URI": store})  # fmt: skip
        said = done.said
        assert done.code == 2 and "Traceback" not in done.stderr, (flaws, done.stderr[-2000:])
        assert len(said) == 1 and said[0].startswith("mlplab: error: "), (flaws, said)
        assert experiment_runs(store, "bad")[1] == [], flaws
