"""Write Fashion-MNIST classes as an image folder, ROOT/{train,val}/<class>/<n>.png, to try mcc on real files.

python scripts/fashion_folder.py runs/own/folder --classes Shirt Sneaker Bag "Ankle boot" --train 200 --val 100
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mcc_train.data import FASHION_MNIST_CLASSES, FASHION_MNIST_DIR, load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--classes", nargs="+", default=FASHION_MNIST_CLASSES, choices=FASHION_MNIST_CLASSES)
    p.add_argument("--train", type=int, default=200, help="images per class from the train split")
    p.add_argument("--val", type=int, default=100, help="images per class from the test split")
    p.add_argument("--dir", default=FASHION_MNIST_DIR, help="the IDX files")
    args = p.parse_args()
    splits = load_data(f"fashion-mnist:{args.dir}")
    for split, data, per_class in (("train", splits.train, args.train), ("val", splits.val, args.val)):
        for name in args.classes:
            folder = args.root / split / name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            index = np.flatnonzero(data.labels == FASHION_MNIST_CLASSES.index(name))[:per_class]
            for i in index:
                Image.fromarray(data.images[i]).save(folder / f"{i}.png")
    print(f"wrote {args.root}/{{train,val}}/<{len(args.classes)} classes>")


if __name__ == "__main__":
    main()
