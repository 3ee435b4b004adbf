"""The data of `configs/examples/`, written from what scikit-learn ships (nothing downloaded):
`python -m mlplab.data.examples [FOLDER]` (`make examples`) writes, under `data/examples/`,

- `wine.csv`: 178 wines, 13 measurements and the cultivar by name (table classification);
- `diabetes.parquet`: 442 patients, 10 measurements (sex as a category) and the disease
  progression a year later (table regression);
- `digits/<digit>/<n>.png`: scikit-learn's 1,797 8x8 digits as PNG files (image folder).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np


def write_examples(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_diabetes, load_digits, load_wine

    folder = Path(root) / "data" / "examples"
    folder.mkdir(parents=True, exist_ok=True)

    wine = load_wine(as_frame=True)
    table = wine.data.copy()
    table["cultivar"] = np.asarray(wine.target_names)[wine.target]
    table.to_csv(folder / "wine.csv", index=False)

    diabetes = load_diabetes(as_frame=True, scaled=False).frame
    diabetes["sex"] = diabetes["sex"].map({1.0: "a", 2.0: "b"})  # coded 1/2 in the source
    diabetes.rename(columns={"target": "progression"}).to_parquet(
        folder / "diabetes.parquet", index=False
    )

    digits = load_digits()
    for i, (image, label) in enumerate(zip(digits.images, digits.target, strict=True)):
        path = folder / "digits" / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image * (255 / 16)).round().astype(np.uint8), mode="L").save(path)
    return folder


if __name__ == "__main__":
    written = write_examples(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
    print(f"wrote {written}/wine.csv, diabetes.parquet, digits/")
