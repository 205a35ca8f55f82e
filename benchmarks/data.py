"""The suite's data sets, built offline and cached: scikit-learn digits upsampled, and characters rendered with Pillow.

Both are float32 [N, 1, S, S] standardised images with int64 labels, split into train / calibration / test. The
calibration split is what pruners see (onnxprune's --calib, Torch-Pruning's Taylor gradients and BN re-estimation,
onnxsim's Wanda statistics); the test split is only ever used to report accuracy.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import string

import numpy as np

CACHE = pathlib.Path(os.environ.get("ONNXPRUNE_BENCH_CACHE", pathlib.Path.home() / ".cache" / "onnxprune-bench"))
CHARACTERS = (string.digits + string.ascii_uppercase + string.ascii_lowercase)[:60]


@dataclasses.dataclass
class Dataset:
    name: str
    train: tuple[np.ndarray, np.ndarray]
    calib: tuple[np.ndarray, np.ndarray]
    test: tuple[np.ndarray, np.ndarray]

    @property
    def classes(self) -> int:
        return int(self.train[1].max()) + 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.train[0].shape[1:])


def load(name: str, *, n_calib: int = 512, size: int | None = None, per_class: int | None = None) -> Dataset:
    """`digits` (10 classes, 16x16) or `chars` (60 classes, 32x32), cached under CACHE."""
    if name == "digits":
        x, y = _digits(size or 16)
    elif name == "chars":
        x, y = _cached(f"chars_{size or 32}_{per_class or 200}", lambda: _characters(size or 32, per_class or 200))
    else:
        raise ValueError(f"unknown data set {name!r}")
    order = np.random.default_rng(0).permutation(len(x))
    n_test = max(len(x) // 5, 1)
    test, calib, train = order[:n_test], order[n_test : n_test + n_calib], order[n_test + n_calib :]
    return Dataset(name, (x[train], y[train]), (x[calib], y[calib]), (x[test], y[test]))


def _cached(key: str, make) -> tuple[np.ndarray, np.ndarray]:
    path = CACHE / f"{key}.npz"
    if path.exists():
        with np.load(path) as f:
            return f["x"], f["y"]
    x, y = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, x=x, y=y)
    os.replace(tmp, path)
    return x, y


def _digits(size: int) -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = np.stack(
        [
            np.asarray(Image.fromarray((im * 16).astype(np.uint8)).resize((size, size), Image.BILINEAR), np.float32)
            for im in digits.images
        ]
    )
    x = (x / 256.0 - 0.3) / 0.4
    return x[:, None].astype(np.float32), digits.target.astype(np.int64)


def _fonts() -> list:
    """TrueType fonts of this machine (DejaVu, Liberation...), else Pillow's own scalable default."""
    from PIL import ImageFont

    found = []
    for folder in ("/usr/share/fonts", "/usr/local/share/fonts", "/System/Library/Fonts", "C:/Windows/Fonts"):
        found += sorted(str(p) for p in pathlib.Path(folder).rglob("*.ttf")) if pathlib.Path(folder).is_dir() else []
    fonts = []
    for path in found[:12]:
        try:
            fonts.append(ImageFont.truetype(path, 40))
        except OSError:
            continue
    return fonts or [ImageFont.load_default(size=40)]


def _characters(size: int, per_class: int) -> tuple[np.ndarray, np.ndarray]:
    """Each character in every font, with random rotation, scale, shift, stroke width and noise."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    fonts = _fonts()
    images, labels = [], []
    for label, char in enumerate(CHARACTERS):
        for i in range(per_class):
            font = fonts[i % len(fonts)]
            canvas = Image.new("L", (64, 64), 0)
            draw = ImageDraw.Draw(canvas)
            draw.text((32, 32), char, fill=255, font=font, anchor="mm", stroke_width=int(rng.integers(0, 2)))
            angle = rng.uniform(-12, 12)
            scale = rng.uniform(0.75, 1.1)
            canvas = canvas.rotate(angle, resample=Image.BILINEAR, translate=tuple(rng.integers(-5, 6, 2)))
            side = int(64 / scale)
            left = (64 - side) // 2
            canvas = canvas.crop((left, left, left + side, left + side)) if side < 64 else canvas
            im = np.asarray(canvas.resize((size, size), Image.BILINEAR), np.float32) / 255.0
            im = im + rng.normal(0, 0.08, im.shape)
            images.append(im)
            labels.append(label)
    x = ((np.stack(images) - 0.15) / 0.3).astype(np.float32)[:, None]
    return x, np.asarray(labels, np.int64)


DOC_MODULES = (
    "argparse", "asyncio", "collections", "csv", "datetime", "decimal", "email", "fractions", "ftplib", "http.client",
    "json", "logging", "pathlib", "pickle", "random", "re", "shutil", "socket", "sqlite3", "statistics", "subprocess",
    "tarfile", "textwrap", "threading", "typing", "unittest", "urllib.parse", "uuid", "xml.dom.minidom", "zipfile",
)  # fmt: skip
TEXT_LENGTH = 64  # characters per sample
PAD = 0


def text(*, n_calib: int = 256) -> Dataset:
    """Pieces of the standard library's docstrings (`TEXT_LENGTH` characters, ASCII codes, 0 pads) labelled by module.

    Every public function, class and method docstring of the `DOC_MODULES`, cut into word-aligned pieces; shorter
    pieces are padded (a padding mask is what a text encoder's users pass). Built from this interpreter's standard
    library, so it needs nothing downloaded; split like the image sets (test 20 %, calibration, train).
    """
    import importlib
    import inspect

    pieces: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(DOC_MODULES):
        module = importlib.import_module(name)
        seen: set[str] = set()
        for obj in [module, *(getattr(module, a) for a in dir(module) if not a.startswith("_"))]:
            members = (
                [obj, *(v for k, v in vars(obj).items() if not k.startswith("_"))] if inspect.isclass(obj) else [obj]
            )
            for member in members:
                doc = inspect.getdoc(member) if callable(member) or inspect.ismodule(member) else None
                home = getattr(member, "__module__", None) or name
                if not doc or doc in seen or home.split(".")[0] != name.split(".")[0]:
                    continue
                seen.add(doc)
                line = ""
                for word in " ".join(doc.split()).split(" "):
                    if len(line) + len(word) + 1 > TEXT_LENGTH:
                        pieces.append(line)
                        labels.append(label)
                        line = ""
                    line = f"{line} {word}".strip()[:TEXT_LENGTH]
                if len(line) >= 16:
                    pieces.append(line)
                    labels.append(label)
    ids = np.zeros((len(pieces), TEXT_LENGTH), np.int64)
    for i, piece in enumerate(pieces):
        codes = [min(ord(c), 127) for c in piece]
        ids[i, : len(codes)] = codes
    mask = (ids != PAD).astype(np.int64)
    x, y = np.stack([ids, mask], 1), np.asarray(labels, np.int64)  # [N, 2, L]: ids and mask
    order = np.random.default_rng(0).permutation(len(x))
    n_test = max(len(x) // 5, 1)
    test, calib, train = order[:n_test], order[n_test : n_test + n_calib], order[n_test + n_calib :]
    return Dataset("text", (x[train], y[train]), (x[calib], y[calib]), (x[test], y[test]))
