"""The largest ratio each method reaches within the transformer issue's bounds, on the trained ViT and text encoder.

    python -m benchmarks.largest_ratio [--methods best,channel,heads,units,basis] [--no-vit] [--no-text]

For each model and method, `onnxprune IN OUT --ratio R --calib calib --method M --force` (256 calibration samples;
`best` is the default command) is bisected over R in `GRID` (0.05 to 0.95 by 0.05) for the largest R whose written
model stays within the bound: test accuracy at most 1 point below the original's (ViT, 2400 test images) or mean
embedding cosine with the original at least 0.98 (text encoder, 1825 held-out pieces). `--force` writes what the
guard refuses, so the bound is judged on every ratio; whether the default guard passed it is kept beside
(``guard_held``). Bisection assumes the quality falls with the ratio; every ratio tried is in the JSON. Writes
results/largest_ratio.json and prints a markdown table. `channel` removes attention heads and MLP units (on the
text encoder the hidden width stays whole: its embeddings' LayerNorm blocks it; on the ViT the patch embedding's
channels, the residual width, go too, through every LayerNorm); `heads` and `units` are `channel` with the others
excluded (`--exclude` of the MLP's first projections and the patch embedding, or of the Q/K/V projections and the
patch embedding); `basis` is the low-rank split with its refit; `best` is the default choice between them.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import tempfile
from collections.abc import Callable

import numpy as np
import onnx

from benchmarks.cases import accuracy, run_cli
from benchmarks.transformers import CALIB, embeddings, export, text_encoder
from onnxprune.budget import count

ROOT = pathlib.Path(__file__).resolve().parent
GRID = [round(0.05 * i, 2) for i in range(1, 20)]
ACCURACY_DROP = 0.01  # ViT: at most 1 point of test accuracy
MIN_COSINE = 0.98  # text encoder: mean embedding cosine with the original


EXCLUDE = {  # --exclude patterns per model that leave one kind of unit to `channel`
    "vit": {"heads": ["*/fc1/*", "/embed/*"], "units": ["*/qkv/*", "/embed/*"]},
    "text": {"heads": ["/fc1*"], "units": ["/q*"]},
}


def method_args(model: str, method: str) -> list[str]:
    """The CLI flags of `method` ("best", "channel", "basis", or "heads"/"units": channel with the rest excluded)."""
    if method not in ("heads", "units"):
        return ["--method", method]
    return ["--method", "channel", *(a for p in EXCLUDE[model][method] for a in ("--exclude", p))]


def largest(
    path: pathlib.Path,
    calib: pathlib.Path,
    method: str,
    quality: Callable[[str], float],
    holds: Callable[[float], bool],
    model: str,
) -> dict:
    """Bisect `GRID` for the largest ratio whose forced result `holds`; every ratio tried with its measurements."""
    tried: dict[float, dict] = {}
    base = count(onnx.load(path))[0]
    lo, hi = -1, len(GRID)  # GRID[lo] holds (or nothing did yet), GRID[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        ratio = GRID[mid]
        out = path.with_name(f"{path.stem}_{method}_{ratio}.onnx")
        report = out.with_suffix(".json")
        cmd = [str(path), str(out), "--ratio", str(ratio), "--calib", str(calib), "--force", "--overwrite"]
        run = run_cli([*cmd, *method_args(model, method), "--report", str(report)])
        entry = {"exit": run["exit"], "seconds": run["seconds"]}
        if run["exit"] == 0 and out.exists():
            facts = json.loads(report.read_text())
            entry.update(
                quality=quality(str(out)),
                removed=1 - count(onnx.load(out))[0] / base,
                written=facts.get("method"),
                guard_held=(facts.get("guard") or {}).get("held"),
            )
        else:
            entry["stderr"] = run["stderr"]
        tried[ratio] = entry
        print(f"{path.stem} {method} {ratio}: {entry}", flush=True)
        if "quality" in entry and holds(entry["quality"]):
            lo = mid
        else:
            hi = mid
    best = GRID[lo] if lo >= 0 else None
    return {"method": method, "largest": best, "at_largest": tried.get(best), "tried": tried}


def vit(tmp: pathlib.Path, methods: list[str]) -> list[dict]:
    from benchmarks import data
    from benchmarks.run import trained
    from benchmarks.transformers import EPOCHS

    dataset = data.load("chars", n_calib=512)
    model, _ = trained(dataset, "vit", {}, EPOCHS, data.CACHE)
    x, y = dataset.test
    path, calib = tmp / "vit.onnx", tmp / "vit_calib.npy"
    export(model, path, dataset.shape, "torchscript")
    np.save(calib, dataset.calib[0][:CALIB])
    base = accuracy(str(path), x, y)
    rows = []
    for m in methods:
        found = largest(path, calib, m, lambda p: accuracy(p, x, y), lambda a: a >= base - ACCURACY_DROP - 1e-9, "vit")
        rows.append(
            {"model": "vit (torchscript)", "original": base, "bound": f"accuracy >= {base - 0.01:.4f}", **found}
        )
    return rows


def text(tmp: pathlib.Path, methods: list[str]) -> list[dict]:
    from benchmarks import nets

    model, dataset = text_encoder()
    path, calib = tmp / "text.onnx", tmp / "text_calib.npz"
    nets.export_text(model, path, dataset.train[0].shape[-1])
    ids = dataset.calib[0][:CALIB]
    np.savez(calib, input_ids=ids[:, 0], attention_mask=ids[:, 1])
    x = dataset.test[0]
    reference = embeddings(str(path), x)

    def cosine(p: str) -> float:
        e = embeddings(p, x)
        return float(
            np.mean(np.sum(e * reference, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(reference, axis=1)))
        )

    rows = []
    for m in methods:
        found = largest(path, calib, m, cosine, lambda c: c >= MIN_COSINE, "text")
        rows.append(
            {"model": "text encoder (torchscript)", "original": 1.0, "bound": f"cosine >= {MIN_COSINE}", **found}
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="best,channel,heads,units,basis")
    parser.add_argument("--no-vit", dest="vit", action="store_false")
    parser.add_argument("--no-text", dest="text", action="store_false")
    parser.add_argument("--out", default=str(ROOT / "results" / "largest_ratio.json"))
    args = parser.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp())
    methods = args.methods.split(",")
    rows = (text(tmp, methods) if args.text else []) + (vit(tmp, methods) if args.vit else [])
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(json.dumps({"grid": GRID, "calib": CALIB, "rows": rows}, indent=1))
    print("| model | method | bound | largest ratio within it | quality there | params removed | default guard |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        at = r["at_largest"] or {}
        quality = f"{at['quality']:.4f}" if "quality" in at else "—"
        guard = {True: "passed", False: "refused", None: "—"}[at.get("guard_held")]
        name = {"best": "best (default)", "heads": "channel: heads only", "units": "channel: MLP units only"}.get(
            r["method"], r["method"]
        )
        print(
            f"| {r['model']} | {name} | {r['bound']} | {r['largest'] or 'none of the grid'} | {quality} | "
            f"{100 * at.get('removed', 0):.1f} % | {guard} |"
        )


if __name__ == "__main__":
    main()
