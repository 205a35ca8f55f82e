"""The benchmark suite: onnxprune beside its peers on the same trained models, in one run.

Usage (after `pip install .[bench]`):
    python -m benchmarks.run --quick     # digits ResNet, 3 ratios, main methods and peers: < 15 min on 2 cores
    python -m benchmarks.run             # 3 networks on 60 rendered characters, 4 ratios, every method/criterion

Writes <out>/suite.json (every row), <out>/suite.md (tables), <out>/*.png (plots) and, for the full run,
benchmarks/RESULTS.md. Data and trained models are cached under $ONNXPRUNE_BENCH_CACHE (~/.cache/onnxprune-bench).
Every row: test accuracy in onnxruntime, parameters and MACs removed (counted on the ONNX file by one function),
CPU latency ratio to the unpruned model at batch 1 and 32 (all rows of a model timed interleaved in one run), wall
time and peak RSS of the pruning. Peers get no fine-tuning, as onnxprune gets none.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import tempfile
import time

import numpy as np
import onnx

from benchmarks.measure import peak_rss_mb, peak_rss_reset
from onnxprune.bench import time_models
from onnxprune.budget import count
from onnxprune.calibration.runner import run_batches
from onnxprune.pipeline import prune

HERE = pathlib.Path(__file__).resolve().parent


@dataclasses.dataclass
class Config:
    name: str
    models: list[tuple[str, str, dict]]  # (data set, architecture, constructor options)
    ratios: tuple[float, ...]
    epochs: int
    onnxprune: list[tuple[str, str | None, bool, bool]]  # (method, criterion, calibrated, recovery)
    peers: list[str]
    n_calib: int = 512
    per_class: int | None = None
    size: int | None = None
    runs: int = 30


MAIN = [
    ("basis", None, True, True),
    ("auto", None, True, True),
    ("channel", None, True, True),
    ("basis", None, False, False),
]
FULL = (
    [(method, None, False, False) for method in ("basis", "channel", "double", "auto")]
    + [(method, None, True, False) for method in ("basis", "channel")]  # the recovery ablation
    + [(method, None, True, True) for method in ("basis", "channel", "double", "auto")]
    + [("channel", criterion, True, True) for criterion in ("l1", "bn", "cmi", "discriminant")]
)
PEERS_MAIN = ["tp-magnitude-global", "tp-magnitude-global+bn", "svd", "onnxsim-wanda"]
PEERS_ALL = [
    f"tp-{imp}-{scope}{bn}"
    for imp in ("magnitude", "bn", "taylor")
    for scope in ("global", "uniform")
    for bn in ("", "+bn")
] + ["svd", "onnxsim-wanda"]

CONFIGS = {
    "full": Config(
        "full",
        [("chars", "resnet20", {}), ("chars", "vgg", {}), ("chars", "mobilenetv2", {})],
        (0.3, 0.5, 0.7, 0.9),
        epochs=8,
        onnxprune=FULL,
        peers=PEERS_ALL,
    ),
    "quick": Config(
        "quick",
        [("digits", "resnet20", {"width": 16})],
        (0.5, 0.7, 0.9),
        epochs=20,
        onnxprune=MAIN,
        peers=PEERS_MAIN,
        n_calib=256,
    ),
    "lite": Config(  # the full run's models, 5 epochs, its main variants at three ratios: a third of the time
        "lite",
        [("chars", "resnet20", {}), ("chars", "vgg", {}), ("chars", "mobilenetv2", {})],
        (0.5, 0.7, 0.9),
        epochs=5,
        onnxprune=MAIN,
        peers=PEERS_MAIN + ["tp-bn-uniform+bn"],
    ),
    "tiny": Config(  # the test's configuration: every code path of --quick, in seconds
        "tiny",
        [("digits", "resnet20", {"n": 1, "width": 4})],
        (0.3,),
        epochs=1,
        onnxprune=[("auto", None, True, True), ("channel", None, False, False)],
        peers=["tp-magnitude-global+bn", "svd", "onnxsim-wanda"],
        n_calib=64,
        size=8,
        runs=3,
    ),
}


def trained(dataset, arch: str, options: dict, epochs: int, cache: pathlib.Path):
    """The torch model for (data set, arch), trained once and cached; returns (model, train seconds or None)."""
    import torch

    from benchmarks import nets

    key = f"{dataset.name}{dataset.shape[-1]}_{arch}_" + "_".join(f"{k}{v}" for k, v in sorted(options.items()))
    path = cache / f"{key}_e{epochs}.pt"
    model = nets.build(arch, dataset.classes, channels=dataset.shape[0], **options)
    if path.exists():
        model.load_state_dict(torch.load(path))
        model.eval()
        return model, None
    seconds = nets.train(model, *dataset.train, epochs=epochs)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model, seconds


def accuracy(model: onnx.ModelProto, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(run_batches(model, {"image": x}, batch_size=256)["logits"].argmax(1) == y))


def run_peer(peer: str, torch_model, onnx_model, calib: np.ndarray, ratio: float):
    from benchmarks import peers

    if peer == "svd":
        return peers.plain_svd(torch_model, calib, ratio)
    if peer == "onnxsim-wanda":
        return peers.onnxsim_wanda(onnx_model, calib, ratio)
    _, importance, scope = peer.removesuffix("+bn").split("-")
    return peers.torch_pruning(
        torch_model,
        calib,
        ratio,
        importance=importance,
        global_pruning=scope == "global",
        reestimate=peer.endswith("+bn"),
    )


def bench_model(cfg: Config, dataset_name: str, arch: str, options: dict, work: pathlib.Path, threads: int) -> dict:
    from benchmarks import data, nets

    dataset = data.load(dataset_name, n_calib=cfg.n_calib, size=cfg.size, per_class=cfg.per_class)
    torch_model, train_s = trained(dataset, arch, options, cfg.epochs, data.CACHE)
    label = f"{dataset_name}-{arch}"
    original_path = work / f"{label}.onnx"
    nets.export(torch_model, original_path, dataset.shape)
    original = onnx.load(original_path)
    (xc, _), (xt, yt) = dataset.calib, dataset.test
    params, macs = count(original)
    base_acc = accuracy(original, xt, yt)
    print(
        f"\n## {label}: {params:,} params, {macs:,} MACs, test accuracy {100 * base_acc:.1f} % "
        f"({len(xt)} test, {len(xc)} calibration samples, {dataset.classes} classes)",
        flush=True,
    )
    rows = []

    def record(tool: str, variant: str, ratio: float, make) -> None:
        peak_rss_reset()
        start = time.perf_counter()
        try:
            pruned, extra = make()
        except Exception as err:  # a peer that cannot reach the target is a result, not a crash of the suite
            rows.append({"tool": tool, "variant": variant, "ratio": ratio, "error": f"{type(err).__name__}: {err}"})
            print(f"  {tool:9} {variant:28} {ratio:.1f}  failed: {type(err).__name__}: {str(err)[:100]}", flush=True)
            return
        wall = time.perf_counter() - start
        peak = peak_rss_mb()
        p, m = count(pruned)
        path = work / f"{label}_{tool}_{variant}_{ratio}.onnx".replace("+", "p").replace("/", "-").replace(" ", "_")
        onnx.save(pruned, path)
        row = {
            "tool": tool,
            "variant": variant,
            "ratio": ratio,
            "params_removed": 1 - p / params,
            "macs_removed": 1 - m / macs,
            "accuracy": accuracy(pruned, xt, yt),
            "matched": abs(1 - p / params - ratio) <= 0.01,  # within one point of the target
            "wall_s": wall,
            "peak_rss_mb": peak,
            "path": str(path),
            **extra,
        }
        rows.append(row)
        print(
            f"  {tool:9} {variant:28} {ratio:.1f}  params -{100 * row['params_removed']:5.1f} %  "
            f"MACs -{100 * row['macs_removed']:5.1f} %  acc {100 * row['accuracy']:5.1f} %  {wall:6.1f} s",
            flush=True,
        )

    for ratio in cfg.ratios:
        for method, criterion, calibrated, recovery in cfg.onnxprune:
            variant = (
                method
                + (f"/{criterion}" if criterion else "")
                + (("+calib" + ("+refit" if recovery else "")) if calibrated else " data-free")
            )
            record(
                "onnxprune",
                variant,
                ratio,
                lambda method=method, criterion=criterion, calibrated=calibrated, recovery=recovery, ratio=ratio: (
                    prune(
                        original,
                        remove_ratio=ratio,
                        method=method,
                        criterion=criterion,
                        calib={"image": xc} if calibrated else None,
                        compensate=recovery,
                        latency_batch=1,
                        threads=threads,
                    )[0],
                    {},
                ),
            )
        for peer in cfg.peers:
            record(
                peer.split("-")[0],
                peer,
                ratio,
                lambda peer=peer, ratio=ratio: run_peer(peer, torch_model, original, xc, ratio),
            )

    ok = [r for r in rows if "error" not in r]
    timings = time_models(
        [str(original_path)] + [r["path"] for r in ok], batches=[1, 32], threads=threads, runs=cfg.runs
    )
    for batch in (1, 32):
        at = [t for t in timings if t.batch == batch]
        for row, t in zip(ok, at[1:]):
            row[f"speedup_b{batch}"] = t.speedup
        base = at[0]
        print(f"  latency of the original at batch {batch}: {base.median_ms:.2f} ms (median of {base.runs})")
    return {
        "model": label,
        "config": cfg.name,
        "dataset": dataset_name,
        "arch": arch,
        "options": options,
        "classes": dataset.classes,
        "params": params,
        "macs": macs,
        "accuracy": base_acc,
        "train_seconds": train_s,
        "rows": [{k: v for k, v in r.items() if k != "path"} for r in rows],
    }


def best_by_tool(result: dict) -> dict[str, dict[float, dict]]:
    """For each tool (onnxprune, tp, svd, onnxsim), its most accurate variant at each ratio."""
    best: dict[str, dict[float, dict]] = {}
    for r in result["rows"]:
        if "error" in r:
            continue
        slot = best.setdefault(r["tool"], {})
        if r["ratio"] not in slot or r["accuracy"] > slot[r["ratio"]]["accuracy"]:
            slot[r["ratio"]] = r
    return best


def markdown(results: list[dict], cfg: Config, machine: str, seconds: float) -> str:
    lines = [f"{machine}; whole run {seconds / 60:.1f} min.", ""]
    for res in results:
        lines += [
            f"### {res['model']}: {res['params']:,} params, {res['macs']:,} MACs, "
            f"test accuracy {100 * res['accuracy']:.1f} % (configuration `{res.get('config', 'full')}`)",
            "",
            "| tool | variant | target | params removed | MACs removed | accuracy | latency ratio b1 | b32 "
            "| wall s | peak RSS MB |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in sorted(res["rows"], key=lambda r: (r["ratio"], r["tool"] != "onnxprune", r["tool"], r["variant"])):
            if "error" in r:
                lines.append(f"| {r['tool']} | {r['variant']} | {r['ratio']} | failed: {r['error'][:80]} ||||||| ")
                continue
            lines.append(
                f"| {r['tool']} | {r['variant']} | {r['ratio']} | {100 * r['params_removed']:.1f} %"
                f"{'' if r['matched'] else ' (off target)'} | "
                f"{100 * r['macs_removed']:.1f} % | {100 * r['accuracy']:.1f} % | "
                f"{1 / r.get('speedup_b1', float('nan')):.2f} | {1 / r.get('speedup_b32', float('nan')):.2f} | "
                f"{r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} |"
            )
        lines += [
            "",
            "Largest parameter removal with accuracy within 1 point of the unpruned model (best variant):",
            "",
        ]
        lines += ["| tool | ratio | params removed | accuracy | variant |", "|---|---|---|---|---|"]
        for tool, by_ratio in best_by_tool(res).items():
            good = [r for r in by_ratio.values() if r["accuracy"] >= res["accuracy"] - 0.01]
            top = max(good, key=lambda r: r["params_removed"]) if good else None
            lines.append(
                f"| {tool} | {top['ratio']} | {100 * top['params_removed']:.1f} % | {100 * top['accuracy']:.1f} % | "
                f"{top['variant']} |"
                if top
                else f"| {tool} | below the smallest ratio run | | | |"
            )
        lines.append("")
    lines.append(
        "Latency ratio = pruned median / original median (below 1 is faster), onnxruntime CPU, interleaved runs."
    )
    return "\n".join(lines)


def plots(results: list[dict], out: pathlib.Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    for res in results:
        fig, ax = plt.subplots(figsize=(10, 5))
        variants = sorted({(r["tool"], r["variant"]) for r in res["rows"] if "error" not in r})
        ax.set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(len(variants))])
        for tool, variant in variants:
            pts = sorted(
                (r["params_removed"], r["accuracy"])
                for r in res["rows"]
                if "error" not in r and (r["tool"], r["variant"]) == (tool, variant)
            )
            ax.plot(
                *zip(*pts),
                marker="o",
                lw=2 if tool == "onnxprune" else 1,
                ls="-" if tool == "onnxprune" else "--",
                label=variant if tool == "onnxprune" else f"{tool}: {variant}" if tool != variant else tool,
            )
        ax.axhline(res["accuracy"], color="k", lw=0.8, ls=":", label="unpruned")
        ax.set(xlabel="parameters removed", ylabel="test accuracy", title=res["model"], ylim=(0, 1.02))
        ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out / f"{res['model']}_accuracy.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path.name)
    fig, ax = plt.subplots(figsize=(6, 5))
    for res in results:
        for tool, marker in (("onnxprune", "o"), ("tp", "s"), ("svd", "^"), ("onnxsim", "x")):
            pts = [
                (1 - r["macs_removed"], 1 / r["speedup_b1"])
                for r in res["rows"]
                if r["tool"] == tool and "speedup_b1" in r
            ]
            if pts:
                ax.scatter(*zip(*pts), marker=marker, s=18, label=f"{res['model']} {tool}")
    ax.plot([0, 1.2], [0, 1.2], "k:", lw=1, label="ideal (latency ∝ MACs)")
    ax.set(xlabel="MAC ratio (pruned / original)", ylabel="latency ratio at batch 1", xlim=(0, 1.1), ylim=(0, None))
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "latency_vs_macs.png", dpi=110)
    plt.close(fig)
    return written + ["latency_vs_macs.png"]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_const", const="quick", dest="config", default="full")
    parser.add_argument("--tiny", action="store_const", const="tiny", dest="config", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="results folder (default benchmarks/results)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads for timing (default 1)")
    parser.add_argument("--lite", action="store_const", const="lite", dest="config", help="main variants, 3 ratios")
    parser.add_argument("--models", default="", help="comma-separated architectures to keep (default all)")
    parser.add_argument("--append", action="store_true", help="keep the other models already in <out>/suite.json")
    parser.add_argument("--render", action="store_true", help="only re-write tables and plots from <out>/suite.json")
    args = parser.parse_args(argv)
    cfg = CONFIGS[args.config]
    keep = set(filter(None, args.models.split(",")))
    out = args.out or HERE / "results" / ("" if cfg.name in ("full", "lite") else cfg.name)
    out.mkdir(parents=True, exist_ok=True)
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    start = time.perf_counter()
    results = []
    if args.render:
        earlier = json.loads((out / "suite.json").read_text())
        return write(earlier["models"], cfg, earlier["machine"], earlier["seconds"], out)[0]
    if args.append and (out / "suite.json").exists():
        earlier = json.loads((out / "suite.json").read_text())
        results = [m for m in earlier["models"] if not keep or m["arch"] not in keep]
        start -= earlier["seconds"]
    with tempfile.TemporaryDirectory() as tmp:
        for dataset, arch, options in cfg.models:
            if not keep or arch in keep:
                results.append(bench_model(cfg, dataset, arch, options, pathlib.Path(tmp), args.threads))
                summary, table = write(results, cfg, machine, time.perf_counter() - start, out)  # after each model
    print("\n" + table)
    return summary


def write(results: list[dict], cfg: Config, machine: str, seconds: float, out: pathlib.Path) -> tuple[dict, str]:
    """suite.json, suite.md, the plots and (full configuration) benchmarks/RESULTS.md from the rows so far."""
    summary = {"config": cfg.name, "machine": machine, "seconds": seconds, "models": results}
    (out / "suite.json").write_text(json.dumps(summary, indent=1))
    table = markdown(results, cfg, machine, seconds)
    (out / "suite.md").write_text(table + "\n")
    figures = plots(results, out)
    if cfg.name in ("full", "lite"):
        (HERE / "RESULTS.md").write_text(
            "# Benchmark results\n\nProduced by `python -m benchmarks.run` (nothing typed in by hand).\n\n"
            + table
            + "\n\n"
            + "\n".join(f"![{f}](results/{f})" for f in figures)
            + "\n"
        )
    return summary, table


if __name__ == "__main__":
    main()
