import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from sklearn.datasets import load_iris
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, TensorDataset

from mlplab.data.base import TensorsDataset, _batch_as_is
from mlplab.errors import UserError
from mlplab.speed.fast_path import FastPath
from my_project.data import (
    DigitsDataModule,
    IrisClassificationDataModule,
    IrisRegressionDataModule,
    MoonsDataModule,
    XORDataModule,
)


def ready(dm):
    dm.setup("fit")
    return dm


@pytest.mark.parametrize(
    "dm, sizes, features, target_shape, target_dtype",
    [
        (XORDataModule(), {"train": 4, "val": 4, "test": 4}, 2, (), torch.int64),
        (MoonsDataModule(), {"train": 400, "val": 200, "test": 200}, 2, (), torch.int64),
        (IrisClassificationDataModule(), {"train": 100, "val": 50}, 4, (), torch.int64),
        (IrisRegressionDataModule(), {"train": 100, "val": 50}, 3, (1,), torch.float32),
        (DigitsDataModule(), {"train": 1000, "val": 797}, 64, (), torch.int64),
    ],
    ids=lambda v: type(v).__name__ if hasattr(v, "setup") else None,
)
def test_splits_shapes_and_dtypes(dm, sizes, features, target_shape, target_dtype):
    ready(dm)
    assert {k: len(v[0]) for k, v in dm.data.items()} == sizes
    assert tuple(dm.splits) == tuple(sizes)
    for x, y in dm.data.values():
        assert x.dtype == torch.float32 and x.shape[1:] == (features,)
        assert y.dtype == target_dtype and y.shape[1:] == target_shape
    assert dm.num_features == features


def test_xor_is_the_truth_table():
    x, y = ready(XORDataModule()).data["train"]
    assert y.tolist() == [int(a != b) for a, b in x.tolist()]


def test_iris_split_is_the_seeds_train_test_split():
    iris = load_iris()
    x_train, x_val, y_train, y_val = train_test_split(
        iris.data, iris.target, test_size=1 / 3, random_state=999
    )
    dm = ready(IrisClassificationDataModule())
    np.testing.assert_allclose(dm.data["train"][0].numpy(), x_train, rtol=1e-6)
    assert dm.data["val"][1].tolist() == y_val.tolist()
    reg = ready(IrisRegressionDataModule())
    np.testing.assert_allclose(reg.data["val"][1].numpy()[:, 0], x_val[:, 3], rtol=1e-6)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = (
        ready(MoonsDataModule(seed=3)),
        ready(MoonsDataModule(seed=3)),
        ready(MoonsDataModule(seed=4)),
    )
    assert torch.equal(a.data["train"][0], b.data["train"][0])
    assert not torch.equal(a.data["train"][0], c.data["train"][0])
    assert not torch.equal(a.data["train"][0][:200], a.data["val"][0])  # splits are distinct draws


def test_digits_train_on_the_first_1000():
    dm = ready(DigitsDataModule())
    assert dm.data["train"][0].max() == 16  # raw pixel values, as the seed uses them
    assert dm.data["val"][1][0].item() == int(
        __import__("sklearn.datasets").datasets.load_digits().target[1000]
    )


def test_standardisation_uses_the_training_split_only():
    dm = ready(IrisClassificationDataModule(standardize=True))
    mean, std = dm.feature_stats()
    x_train = dm.data["train"][0]
    torch.testing.assert_close(mean, x_train.mean(0))
    torch.testing.assert_close(std, x_train.std(0))
    assert not torch.allclose(mean, torch.cat([x_train, dm.data["val"][0]]).mean(0))


def test_missing_split_is_a_clear_error():
    dm = ready(DigitsDataModule())
    with pytest.raises(UserError, match="no .test. split.*run another command than .mlplab test."):
        dm.test_dataloader()


def test_batched_fetch_gives_the_same_batches_as_per_sample_collate():
    """The fast path (one index per batch) yields what the textbook DataLoader yields."""
    x, y = torch.randn(103, 5), torch.randint(0, 3, (103,))
    fast = DataLoader(
        TensorsDataset(x, y),
        batch_size=16,
        shuffle=True,
        collate_fn=_batch_as_is,
        generator=torch.Generator().manual_seed(7),
    )
    slow = DataLoader(
        TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7)
    )
    pairs = list(zip(fast, slow, strict=True))
    assert len(pairs) == 7
    for (fx, fy), (sx, sy) in pairs:
        assert torch.equal(fx, sx) and torch.equal(fy, sy)


def test_batch_size_zero_means_the_whole_split():
    dm = ready(IrisClassificationDataModule(batch_size=0))
    ((x, _),) = list(dm.train_dataloader())
    assert len(x) == 100
    ((x, _),) = list(dm.val_dataloader())
    assert len(x) == 50


def test_training_batches_come_in_chunks_and_evaluation_in_large_batches():
    dm = ready(DigitsDataModule(batch_size=16, chunk=4))
    fast = FastPath()
    fast.chunk = 4  # what it decides in a fit where nothing needs single batches
    dm.trainer = Trainer(callbacks=[fast], logger=False, enable_checkpointing=False)
    chunks = list(dm.train_dataloader())
    assert len(chunks) == 16  # ceil(1000 / 64)
    assert [len(x) for x, _ in chunks[0]] == [16, 16, 16, 16]  # a list of whole batches
    assert [len(x) for x, _ in chunks[-1]] == [16, 16, 8]  # 1000 = 15 * 64 + 40
    assert [len(x) for x, _ in dm.val_dataloader()] == [64] * 12 + [29]
