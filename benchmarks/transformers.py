"""The default command on trained transformers (a ViT, a text encoder), as a user types it, beside the peers.

    python -m benchmarks.transformers [--ratios 0.3,0.5] [--methods channel,basis] [--exporters torchscript,dynamo]
        [--no-vit] [--no-text] [--no-peers]

The model is the suite's ViT (`benchmarks.nets.ViT`: patch 4, width 128, 6 blocks, 4 heads, MLP 256, timm's packed
qkv; AdamW, `EPOCHS` epochs on the rendered characters, trained once and cached under $ONNXPRUNE_BENCH_CACHE),
exported with torch's TorchScript exporter (opset 17; head reshapes computed from `Shape`) and, where onnxscript is
installed, its dynamo exporter (opset 18). For each exporter and ratio: `onnxprune IN OUT --ratio R --calib
calib.npy` with 256 unlabelled calibration images (default flags; when the guard refuses, the same with `--force`
so the refused model's accuracy is known), then one ablation row per method (`--method M`: heads and MLP units,
or low rank alone), and the peers on the same model and calibration images (Torch-Pruning's MetaPruner with its
head pruning on the torch model; onnxsim's calibrated head and MLP-unit Wanda pruning after onnxruntime's
transformer fusion, which onnxsim's matching needs; plain truncated SVD of every layer on the ONNX graph). Test
accuracy in onnxruntime on 2400 images, parameters removed, and latency of every written model against the unpruned
one at batch 1 and 32 (alternating blocks, onnxruntime's default threads). Writes results/transformers.json and prints
a markdown table.

The text encoder (`benchmarks.nets.TextEncoder`: BERT-style, token and position embeddings, 4 post-norm blocks of
width 128 with separate Q/K/V and 4 heads, an additive padding mask, mean pooling over the kept tokens) is trained
to tell which standard-library module a 64-character piece of docstring comes from (`data.text`), then exported as
the embedder alone (inputs input_ids and attention_mask [batch, seq], output the [batch, 128] embedding) by each
exporter (dynamo: opset 18, batch and sequence as export dims; its attention reshapes read the sequence length).
Its rows are judged against the original's embeddings of the 1825 held-out pieces: mean cosine and nearest-neighbour
agreement; latency at batch 1 and 32 for sequences of 32 and 128 tokens. Its peers are Torch-Pruning (heads on the
separate Q, K, V and MLP units, the hidden width kept), onnxsim (as for the ViT) and plain SVD.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import tempfile

import numpy as np
import onnx

from benchmarks.cases import run_cli
from benchmarks.defaults import measure_rows, print_table
from onnxprune.bench import time_models
from onnxprune.budget import count

ROOT = pathlib.Path(__file__).resolve().parent
EPOCHS = 25
CALIB = 256  # the transformer issue's calibration set


def export(model, path: pathlib.Path, shape: tuple[int, ...], exporter: str) -> bool:
    """Write `model` with torch's `exporter` (torchscript or dynamo); False when that exporter is not installed."""
    import torch

    from benchmarks import nets

    if exporter == "torchscript":
        nets.export(model, path, shape)
        return True
    try:
        import onnxscript  # noqa: F401 - the dynamo exporter's dependency
    except ImportError:
        return False
    torch.onnx.export(
        model.eval(),
        (torch.zeros(2, *shape),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        opset_version=18,
        dynamo=True,
    )
    return True


def _tp(model, onnx_model, calib, ratio):
    from benchmarks import peers

    return peers.torch_pruning_vit(model, calib, ratio)


def _onnxsim(model, onnx_model, calib, ratio):
    from benchmarks import peers

    return peers.onnxsim_transformer(onnx_model, {"image": calib}, ratio, heads=4, width=128)


def _svd(model, onnx_model, calib, ratio):
    from benchmarks.cases import plain_svd

    return plain_svd(onnx_model, ratio)


PEERS = {  # the same trained model and calibration images, no fine-tuning
    "peer: Torch-Pruning (heads, MLP units, width; L2)": _tp,
    "peer: onnxsim heads + units (Wanda, after onnxruntime's fusion)": _onnxsim,
    "peer: plain SVD (every MatMul/Gemm/Conv at one rank fraction, data-free)": _svd,
}


TEXT_EPOCHS = 20


def text_encoder():
    """(the suite's trained `nets.TextEncoder`, its data set), trained once and cached (about 10 min on 2 cores)."""
    import torch

    from benchmarks import data, nets

    dataset = data.text()
    model = nets.TextEncoder(128, dataset.classes)
    path = data.CACHE / f"text_encoder_e{TEXT_EPOCHS}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path))
    else:
        nets.train_text(model, *dataset.train, epochs=TEXT_EPOCHS)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), path)
    return model.eval(), dataset


def embeddings(path: str, x: np.ndarray) -> np.ndarray:
    """The model's embeddings of the (ids, mask) pairs `x` [N, 2, L], in onnxruntime."""
    from onnxprune.calibration.runner import run_batches

    return run_batches(onnx.load(path), {"input_ids": x[:, 0], "attention_mask": x[:, 1]}, batch_size=256)[
        "sentence_embedding"
    ]


def text_rows(
    ratios: list[float], methods: list[str], exporters: list[str], tmp: pathlib.Path, peers: bool
) -> list[dict]:
    """The default command, the methods and plain SVD on the trained text encoder, per exporter, judged against the
    original's embeddings of the held-out pieces: mean cosine, and nearest-neighbour agreement (each piece's most
    similar other piece is the same one); latency at batch 1 and 32 for sequences of 32 and 128 tokens."""
    from benchmarks import nets

    model, dataset = text_encoder()
    ids = dataset.calib[0][:CALIB]
    calib = tmp / "text_calib.npz"
    np.savez(calib, input_ids=ids[:, 0], attention_mask=ids[:, 1])
    rows = []
    for exporter in exporters:
        path = tmp / f"text_encoder_{exporter}.onnx"
        if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
            print("dynamo: exporter not installed, skipped", flush=True)
            continue
        nets.export_text(model, path, dataset.train[0].shape[-1], exporter)
        rows += _text_exporter_rows(f"text encoder ({exporter})", path, calib, dataset, ratios, methods, peers, model)
        peers = False  # the peers once, on the first exporter's model
    return rows


def _text_exporter_rows(
    label: str,
    path: pathlib.Path,
    calib: pathlib.Path,
    dataset,
    ratios: list[float],
    methods: list[str],
    peers: bool,
    model,
) -> list[dict]:
    from benchmarks.cases import plain_svd
    from benchmarks.peers import onnxsim_transformer, torch_pruning_text

    found = [{"model": label, "row": "unpruned", "ratio": 0.0, "path": str(path)}]
    feeds = dict(np.load(calib))
    makers = {
        "peer: Torch-Pruning (heads, MLP units; L2)": lambda r: torch_pruning_text(model, feeds, r),
        "peer: onnxsim heads + units (Wanda, after onnxruntime's fusion)": lambda r: onnxsim_transformer(
            onnx.load(path), feeds, r, heads=4, width=128
        ),
        "peer: plain SVD": lambda r: plain_svd(onnx.load(path), r),
    }
    for ratio in ratios if peers else ():
        for name, make in makers.items():
            out = path.with_name(f"{path.stem}_{len(found)}.onnx")
            try:
                pruned, _ = make(ratio)
            except Exception as e:  # noqa: BLE001 - a peer failing is a row of the table, not the end of the run
                found.append({"model": label, "row": name, "ratio": ratio, "error": repr(e)[:200]})
                continue
            onnx.save(pruned, out)
            found.append({"model": label, "row": name, "ratio": ratio, "path": str(out)})
    runs = [("default flags + --calib", r, []) for r in ratios]
    runs += [(f"ablation: --method {m}", r, ["--method", m]) for m in methods for r in ratios]
    for name, ratio, extra in runs:
        out = path.with_name(f"{path.stem}_{len(found)}.onnx")
        cmd = [str(path), str(out), "--ratio", str(ratio), "--calib", str(calib), *extra]
        run = run_cli([*cmd, "--report", str(out.with_suffix(".json"))])
        row = {"model": label, "row": name, "ratio": ratio, **run}
        if out.with_suffix(".json").exists():
            row["method"] = json.loads(out.with_suffix(".json").read_text()).get("method")
        if run["exit"] == 1:
            row["forced_exit"] = run_cli([*cmd, "--force"])["exit"]
        if out.exists():
            row["path"] = str(out)
        found.append(row)
        print(f"{label} {name} {ratio}: exit {run['exit']}, {run['seconds']:.0f} s", flush=True)
    x = dataset.test[0]
    reference = embeddings(str(path), x)
    base = count(onnx.load(path))[0]

    def neighbours(e: np.ndarray) -> np.ndarray:
        unit = e / (np.linalg.norm(e, axis=1, keepdims=True) + 1e-12)
        sim = unit @ unit.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    near = neighbours(reference)
    written = [r for r in found if r.get("path")]
    for r in written:
        e = embeddings(r["path"], x)
        cos = np.sum(e * reference, 1) / (np.linalg.norm(e, axis=1) * np.linalg.norm(reference, axis=1) + 1e-12)
        r["cosine"], r["neighbour_agreement"] = float(cos.mean()), float(np.mean(neighbours(e) == near))
        r["removed"] = 1 - count(onnx.load(r["path"]))[0] / base
        r.pop("stdout", None)
    for seq in (32, 128):
        for b in (1, 32):
            shapes = {"input_ids": [b, seq], "attention_mask": [b, seq]}
            timings = time_models([r["path"] for r in written], batches=[b], shapes=shapes, runs=30)
            for r, t in zip(written, timings, strict=True):
                r[f"ms_b{b}_s{seq}"], r[f"speedup_b{b}_s{seq}"] = t.median_ms, t.speedup
    return found


def vit_rows(ratios: list[float], methods: list[str], exporters: list[str], tmp: pathlib.Path, peers: bool) -> list:
    """The default command, the methods and the peers on the trained ViT, per exporter (see the module's docstring)."""
    from benchmarks import data
    from benchmarks.run import trained

    dataset = data.load("chars", n_calib=512)  # the suite's split; the first CALIB of its calibration images
    model, _ = trained(dataset, "vit", {}, EPOCHS, data.CACHE)
    x, y = dataset.test
    calib = tmp / "vit_calib.npy"
    np.save(calib, dataset.calib[0][:CALIB])
    rows = []
    for exporter in exporters:
        path = tmp / f"vit_{exporter}.onnx"
        if not export(model, path, dataset.shape, exporter):
            print(f"{exporter}: exporter not installed, skipped", flush=True)
            continue
        found = [{"model": f"vit ({exporter})", "row": "unpruned", "ratio": 0.0, "path": str(path)}]
        runs = [("default flags + --calib", r, []) for r in ratios]
        runs += [(f"ablation: --method {m}", r, ["--method", m]) for m in methods for r in ratios]
        for ratio in ratios if peers and exporter == "torchscript" else ():  # the peers, on the same model
            for name, make in PEERS.items():
                out = tmp / f"{exporter}_{len(found)}.onnx"
                try:
                    pruned, knob = make(model, onnx.load(path), dataset.calib[0][:CALIB], ratio)
                except Exception as e:  # noqa: BLE001 - a peer failing is a row of the table, not the end of the run
                    found.append({"model": f"vit ({exporter})", "row": name, "ratio": ratio, "error": repr(e)[:200]})
                    continue
                onnx.save(pruned, out)
                row = {"model": f"vit ({exporter})", "row": name, "ratio": ratio, "knob": knob, "path": str(out)}
                found.append(row)
                print(f"{exporter} {name} {ratio}: made", flush=True)
        for name, ratio, extra in runs:
            out = tmp / f"{exporter}_{len(found)}.onnx"
            cmd = [str(path), str(out), "--ratio", str(ratio), "--calib", str(calib), *extra]
            report = out.with_suffix(".json")
            run = run_cli([*cmd, "--report", str(report)])
            row = {"model": f"vit ({exporter})", "row": name, "ratio": ratio, **run}
            if report.exists():
                facts = json.loads(report.read_text())
                row["method"] = facts.get("method")
                row["fidelity"] = facts.get("fidelity")
            if run["exit"] == 1:  # the guard refused: measure what it refused, say so
                row["forced_exit"] = run_cli([*cmd, "--force"])["exit"]
            if out.exists():
                row["path"] = str(out)
            found.append(row)
            print(f"{exporter} {name} {ratio}: exit {run['exit']}, {run['seconds']:.0f} s", flush=True)
        rows += measure_rows(found, path, x, y)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--methods", default="channel,basis", help="ablation rows, one per method (empty: none)")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--no-peers", dest="peers", action="store_false", help="leave the peers' rows out")
    parser.add_argument("--no-vit", dest="vit", action="store_false", help="leave the ViT out")
    parser.add_argument("--no-text", dest="text", action="store_false", help="leave the text encoder out")
    parser.add_argument("--out", default=str(ROOT / "results" / "transformers.json"))
    args = parser.parse_args(argv)
    tmp = pathlib.Path(tempfile.mkdtemp())
    ratios = [float(r) for r in args.ratios.split(",")]
    methods = [m for m in args.methods.split(",") if m]
    rows = vit_rows(ratios, methods, args.exporters.split(","), tmp, args.peers) if args.vit else []
    if args.text:
        rows += text_rows(ratios, methods, args.exporters.split(","), tmp, args.peers)
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(
        json.dumps({"epochs": EPOCHS, "text_epochs": TEXT_EPOCHS, "calib": CALIB, "rows": rows}, indent=1)
    )
    text = [r for r in rows if r["model"].startswith("text encoder")]
    rows = [r for r in rows if not r["model"].startswith("text encoder")]
    if text:
        print(
            "| model | row | ratio | written | cosine | neighbour agreement | params removed | b1 s32 / s128 (×) "
            "| b32 s32 / s128 (×) |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for r in text:
            quality = (
                f"{r['cosine']:.4f} | {100 * r['neighbour_agreement']:.1f} %"
                if "cosine" in r
                else f"exit {r.get('exit')} | "
            )
            speed = " | ".join(
                " / ".join(f"{r[f'speedup_b{b}_s{s}']:.2f}×" for s in (32, 128)) if f"speedup_b{b}_s32" in r else ""
                for b in (1, 32)
            )
            print(
                f"| {r['model']} | {r['row']} | {r['ratio']} | {r.get('method') or ''} | {quality} | "
                f"{100 * r.get('removed', 0):.1f} % | {speed} |"
            )
    print_table(rows)


if __name__ == "__main__":
    main()
