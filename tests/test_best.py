"""--method best: the basis and the rounded channel result side by side; the one no slower and most faithful wins."""

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import pipeline
from onnxprune.latency import simd_width
from onnxprune.pipeline import prune
from onnxprune.testing import ort_run, random_feeds, summary_item, validate_report

EXAMPLE = Path(__file__).parent.parent / "examples"


def _split(model: onnx.ModelProto) -> bool:
    return any(n.name.endswith(("_basis", "_scaling")) for n in model.graph.node)


@pytest.fixture
def case():
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    return model, {model.graph.input[0].name: np.load(EXAMPLE / "digits_calib.npy")[:160]}


@pytest.mark.parametrize("basis_time", [1.5, 0.97, 0.8])
def test_the_result_written_is_no_slower_then_the_most_faithful_then_the_faster(
    case, monkeypatch, caplog, capsys, basis_time
):
    # a basis result made in over CLEAR_AFTER_S may be written alone; this small model takes less
    monkeypatch.setattr(pipeline, "CLEAR_AFTER_S", 0.0)
    # measured timings vary; fixed ones keep this deterministic: a model with split layers takes `basis_time`
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, basis_time if _split(b) else 0.85))
    model, calib = case
    with caplog.at_level(logging.WARNING):
        out, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    # fit samples few for a refitted layer: said at most once, and only about the result returned (a warning naming
    # a layer of a result not written would send the user after nothing)
    warned = [r.getMessage() for r in caplog.records if "fit samples are few" in r.getMessage()]
    layers = [m.split("'")[1] for m in warned]
    assert len(warned) <= 1 and all(name in {n.name for n in out.graph.node} for name in layers)
    assert sum(r["written"] for r in rows) == 1 and set(rows[0]["speed_check"]) == {1, 32}
    assert all(r["threads"] == 0 for r in rows)
    if next(r for r in rows if r["written"])["method"] == "channel":  # its widest refitted layer wants > 128 samples
        assert len(warned) == 1
    # compared results are measured on the held-out samples (the refit fitted the others), the written one's figure
    # is the report's fidelity; one written unchallenged is not compared (its held-out line says it)
    held = report.facts["fidelity_samples"]
    assert all(r["held_samples"] == held for r in rows) if len(rows) > 1 else "held_agreement" not in rows[0]
    written = next(r for r in rows if r["written"])
    if len(rows) > 1:
        assert written["held_agreement"] == pytest.approx(
            min(f["top1_agreement"] for f in report.facts["fidelity"].values())
        )
    clear = basis_time <= 1 / pipeline.CLEAR_SPEEDUP
    if len(rows) == 1:  # written unchallenged: clearly faster, and faithful on the held-out samples
        assert clear and pipeline._faithful_enough(report.facts["fidelity"])
    else:  # else compared: not clearly faster, or it lost some fidelity
        basis = rows[0]
        assert not clear or basis["held_agreement"] < 1 or basis["held_cosine"] < 1 - pipeline.CLEAR_INFIDELITY
    if len(rows) > 1:  # channel results, with and without measured sensitivity (one that lands more than 3 points
        # past the request in steps of 16 channels is not compared)
        assert (rows[0]["method"], rows[0]["sensitivity"]) == ("basis", True)
        # the basis result measured slower: ranks beside whole channels are made too (as slow when split)
        joint = [r for r in rows[1:] if r.get("channel_options")]
        assert [r["method"] for r in joint] == (["basis"] if basis_time > 1 + pipeline.SPEED_MARGIN else [])
        channel = [r for r in rows[1:] if not r.get("channel_options")]
        assert [r["method"] for r in channel] == ["channel"] * len(channel)
        assert len({r["sensitivity"] for r in channel}) == len(channel)
        assert all(r["round_to"] in (simd_width(), 8) and abs(r["params_removed"] - 0.5) <= 0.03 for r in channel)
        pool = [r for r in rows if not pipeline._slower(r["speed_check"])] if basis_time > 1 else rows  # slower: out
        speed = {1.5: 1 / 1.5, 0.97: 1 / 0.97, 0.8: 1 / 0.8, 0.85: 1 / 0.85}
        # of those within one disagreeing sample of the best and 1 - cosine within 2x of the least among them,
        # the fastest
        wrong = [round((1 - r["held_agreement"]) * r["held_samples"]) for r in pool]
        tied = [r for r, n in zip(pool, wrong) if n <= min(wrong) + 1]
        least = min(1 - r["held_cosine"] for r in tied)
        near = [r for r in tied if 1 - r["held_cosine"] <= max(2 * least, 0.01)]
        assert written == max(near, key=lambda r: (speed[r["speed_check"][1][1]], r["held_cosine"]))
    else:  # a basis result clearly faster than the original and faithful is written without making the others
        assert [r["method"] for r in rows] == ["basis"]
    from onnxprune.cli import _print_summary

    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    chosen = summary_item(capsys.readouterr().out, "chosen")
    if len(rows) > 1:
        assert f"on the {held} held-out samples: of those no slower that keep the guard's floor" in chosen
        assert "of those within a sample of the best agreement" in chosen
        assert chosen.count(", agreement ") == len(rows) == chosen.count(", cosine ")
    else:
        assert (
            "held-out samples" not in chosen
            and "not compared (made in over " in chosen  # the summary's figure is the constant, unpatched there
            and " s, at least 1.10x faster at each batch timed, and every held-out sample agrees" in chosen
            and "(written)" in chosen
        ), chosen
    assert report.facts["method"] == written["method"]
    assert report.facts["speed_check"] == written["speed_check"]
    onnx.checker.check_model(out, full_check=True)
    for batch in (1, 3):  # dynamic batch kept
        assert ort_run(out, random_feeds(out, batch=batch))


def _channel_unreachable(monkeypatch) -> None:
    """Channel results overshoot the request (a ViT's heads and widths rounded to 16): only the basis result is made."""
    one = pipeline.prune_one

    def channel_unreachable(model, **options):
        if options.get("method") == "channel":
            raise pipeline.BudgetError("channel counts rounded to 16 overshoot", reachable=0.9)
        return one(model, **options)

    monkeypatch.setattr(pipeline, "prune_one", channel_unreachable)


def test_a_basis_result_written_because_no_channel_result_reached_says_so(case, monkeypatch, capsys):
    """Not clearly faster, but the channel results overshoot (a ViT's heads and widths rounded to 16): the summary
    says why nothing was compared, not that the basis result was clearly faster."""
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.97))
    _channel_unreachable(monkeypatch)
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    assert [(r["method"], r["unchallenged"], r["written"]) for r in rows] == [
        ("basis", "no channel result reached the request", True)
    ]
    from onnxprune.cli import _print_summary

    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    chosen = summary_item(capsys.readouterr().out, "chosen")
    assert "not compared (no channel result reached the request: no other result was made)" in chosen


def _ranks(model: onnx.ModelProto) -> list[int]:
    """The kept rank of every split layer: its basis op's output channels."""
    weights = {t.name: t.dims for t in model.graph.initializer}
    return [weights[n.input[1]][0] for n in model.graph.node if n.name.endswith("_basis")]


@pytest.mark.parametrize("rounded_reaches", [True, False])
def test_the_basis_result_keeps_ranks_at_multiples_of_the_vector_width_where_that_reaches(
    case, monkeypatch, rounded_reaches
):
    """onnxruntime's blocked NCHWc layout: a rank not a multiple of the block adds reorders the per-layer timings do
    not see (chars ResNet-20 at 0.7: 1.10x free, 1.31x rounded at batch 1). Where the rounded ranks cannot reach the
    request, the ranks are free, as before."""
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.5))  # clearly faster
    made = []
    joint = pipeline._basis_or_joint

    def basis(model, **options):
        made.append(options["round_to"])
        if options["round_to"] > 1 and not rounded_reaches:
            raise pipeline.BudgetError("ranks rounded overshoot", reachable=0.4)
        return joint(model, **options)

    monkeypatch.setattr(pipeline, "_basis_or_joint", basis)
    model, calib = case
    out, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    row = report.facts["alternatives"][0]
    assert row["method"] == "basis" and row["written"]
    ranks = _ranks(out)
    assert ranks, "some layer stays split"
    if rounded_reaches:
        assert made == [simd_width()] and row["round_to"] == simd_width()
        assert all(r % simd_width() == 0 for r in ranks), ranks
    else:
        assert made == [*dict.fromkeys((simd_width(), 8)), 1] and row["round_to"] == 1
    assert abs(report.facts["params_removed"] - 0.5) <= 0.02


def test_without_calibration_or_latency_it_is_basis_alone(case):
    model, calib = case
    for options in ({"calib": None, "latency_batch": 1}, {"calib": calib, "latency_batch": 0}):
        _, report = prune(model, remove_ratio=0.5, method="best", **options)
        assert report.facts["method"] == "basis" and "alternatives" not in report.facts


def test_target_latency_turns_to_channels_when_the_basis_result_saves_too_little(case, monkeypatch):
    from onnxprune.budget import count

    def fake(a, b, feeds, **kw):  # a split model saves 10 % of the time; a channel-pruned one its parameter share
        return (1.0, 0.9) if _split(b) else (1.0, count(b)[0] / count(a)[0])

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    # counts rounded to 8 (a processor with 8-float vectors): rounded to 16 this model's depths are too coarse for
    # the bound on the depth found below
    monkeypatch.setattr(pipeline, "simd_width", lambda: 8)
    model, calib = case
    out, report = prune(model, remove_ratio=0.5, method="best", target="latency", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    channel = [r for r in rows if r["method"] == "channel"]
    assert any(r["written"] for r in channel)  # basis: unreachable here, or short
    # made as for a parameter target: without and with measured layer sensitivity, each searched for its own depth
    # (the depth found without it made at 0.5 of chars ResNet-20's time, 64.9 %; searched for, 95.7 %), compared
    # (each search's shallower result that saved the time asked within a point, not the margin, is compared too)
    searched = [r["sensitivity"] for r in channel if not r.get("edge")]
    assert searched == [False, True] and all("held_agreement" in r for r in channel)
    f = report.facts
    assert f["target"] == "latency" and f["ratio_achieved"] >= 0.49 and f["latency"]["batch"] == 1
    # the least parameter ratio that saves enough, to a bisection step below the deepest reachable depth (a step of
    # the MACs the search bisects on; the parameters a MACs depth removes move with the sensitivity weights)
    assert 0.49 <= f["params_removed"] <= 0.5 + max(pipeline.LATENCY_DEPTHS) / 2**pipeline.LATENCY_STEPS + 0.05
    assert f["latency"]["after_s"] / f["latency"]["before_s"] == pytest.approx(1 - f["ratio_achieved"])
    onnx.checker.check_model(out, full_check=True)


def test_a_latency_target_the_basis_result_meets_is_not_said_clearly_faster(case, monkeypatch, capsys):
    """The basis result saves the time asked (here 1.00x for a request of 0): the summary says why nothing else was
    made, not that it was 'clearly faster' (a new user read that beside 1.00x)."""
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.0))
    model, calib = case
    _, report = prune(model, remove_ratio=0.0, method="best", target="latency", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    assert [(r["method"], r["unchallenged"], r["written"]) for r in rows] == [
        ("basis", "it saves the time asked", True)
    ]
    from onnxprune.cli import _print_summary

    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    chosen = summary_item(capsys.readouterr().out, "chosen")
    assert "not compared (it saves the time asked: no other result was made)" in chosen and "clearly" not in chosen

    validate_report(report.to_dict("in.onnx", "out.onnx"))  # the new reason is in the schema


def test_target_latency_out_of_reach_writes_the_fastest_found_and_says_so(case, monkeypatch):
    from onnxprune.budget import count

    tried = []

    def fake(a, b, feeds, **kw):  # nothing saves more than half of its parameter share
        tried.append(b)
        return (1.0, 0.95) if _split(b) else (1.0, 1 - 0.5 * (1 - count(b)[0] / count(a)[0]))

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    monkeypatch.setattr(pipeline, "simd_width", lambda: 8)  # one width: with 16-float vectors 16 is tried first
    model, calib = case
    out, report = prune(model, remove_ratio=0.6, method="best", target="latency", calib=calib, latency_batch=1)
    f = report.facts
    written = next(r for r in f["alternatives"] if r["written"])
    assert written["method"] == "channel" and f["params_removed"] >= 0.69  # the deepest reachable channel result
    assert f["ratio_achieved"] == pytest.approx(0.5 * f["params_removed"], abs=0.02)
    assert "no result found saves that much" in f["ratio_note"] and "is written" in f["ratio_note"]
    # the deepest was tried first, and as it fell short nothing shallower was made (one basis result, one channel
    # result without measured sensitivity and one with, each timed once while searching and once more at every
    # batch of the comparison)
    channel = [r for r in f["alternatives"] if r["method"] == "channel"]
    assert [r["sensitivity"] for r in channel] == [False, True] and all(r["params_removed"] >= 0.69 for r in channel)
    onnx.checker.check_model(out, full_check=True)


@pytest.mark.parametrize("calibrated", [True, False])
def test_method_channel_takes_a_latency_target(case, monkeypatch, capsys, calibrated):
    """`--method channel --target latency`: channels removed as deep as the measured time needs (it was refused)."""
    from onnxprune.budget import count
    from onnxprune.cli import _print_summary

    def fake(a, b, feeds, **kw):  # a channel-pruned model takes its share of the MACs in time
        return (1.0, count(b)[1] / count(a)[1])

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    model, calib = case
    out, report = prune(
        model, remove_ratio=0.5, method="channel", target="latency", calib=calib if calibrated else None,
        latency_batch=1,
    )  # fmt: skip
    f = report.facts
    assert f["method"] == "channel" and f["target"] == "latency" and f["latency"]["batch"] == 1
    assert f["round_to"] in (simd_width(), 8) and set(f["speed_check"]) == {1, 32}
    assert f["ratio_achieved"] == pytest.approx(f["macs_removed"])  # the fake's time is the MACs' share
    # searched on the share removed, to a step below the deepest reachable depth
    assert 0.49 <= f["ratio_achieved"] <= 0.5 + max(pipeline.LATENCY_DEPTHS) / 2**pipeline.LATENCY_STEPS + 0.02
    # the depth asked of the channel allocation (rounded counts may overshoot it): of the layers' measured time with
    # calibration data (the knapsack takes it), of the MACs without
    assert f["latency"]["depth_of"] == ("latency" if calibrated else "flops")
    assert 0 < f["latency"]["depth"] <= max(pipeline.LATENCY_DEPTHS)
    assert not _split(out)  # a step over the request is said, as every ratio more than a point off is
    assert ("more than asked" in f["ratio_note"]) if f["ratio_achieved"] > 0.51 else ("ratio_note" not in f)
    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("  latency "))
    assert f"removed {100 * f['ratio_achieved']:5.1f} %   at batch 1" in line
    onnx.checker.check_model(out, full_check=True)
    assert ort_run(out, random_feeds(out, batch=3))["logits"].shape == (3, 10)


@pytest.mark.parametrize("method", ["best", "channel"])
def test_a_latency_target_with_round_to_rounds_the_channels_it_removes(case, monkeypatch, method):
    """`--round-to 16 --target latency` was refused by both methods: best made the basis result alone (rounded
    ranks that cannot pay), channel tried only depths that counts rounded to 16 cannot reach on this small model."""
    from onnxprune.budget import count

    def fake(a, b, feeds, **kw):  # a split model saves nothing; a channel-pruned one its share of the MACs
        return (1.0, 1.0) if _split(b) else (1.0, count(b)[1] / count(a)[1])

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    model, calib = case
    out, report = prune(model, remove_ratio=0.3, method=method, target="latency", calib=calib, latency_batch=1,
                        round_to=16)  # fmt: skip
    f = report.facts
    assert f["method"] == "channel" and f["round_to"] == 16 and f["ratio_achieved"] >= 0.29
    assert f["latency"]["depth"] < min(pipeline.LATENCY_DEPTHS)  # below every listed depth: the most reachable
    widths = [d for t in out.graph.initializer if len(t.dims) == 4 for d in t.dims[:1]]
    before = {t.dims[0] for t in model.graph.initializer if len(t.dims) == 4}
    assert all(w % 16 == 0 or w in before for w in widths)


@pytest.mark.parametrize(
    ("reach", "calibrated", "says", "hints"),
    [
        (-0.28, False, "splitting makes this model slower (the fastest plan, timed layer by layer, takes 1.28x the "
         "original's time; layer timings vary between runs)",
         "; --method channel or --calib (--method best then tries channel removal too)"),
        (-3e8, True, "takes over 10x the original's time", "; --method channel"),
        (0.3, True, "the split layers, timed one by one, save at most about 0.300 of the model's time",
         "; lower --ratio or --method channel"),
    ],
)  # fmt: skip
def test_a_latency_target_out_of_reach_of_bases_is_said_in_time_not_in_a_negative_share(reach, calibrated, says, hints):
    """It said 'at most -0.193 can be removed ... lower --ratio or --method channel', and channel refused latency."""

    def unreachable(*args, **kwargs):
        raise pipeline.BudgetError("--ratio 0.50 cannot be reached: at most ...; lower --ratio", reachable=reach)

    hinted = pipeline._hinted("basis", 1, unreachable, "latency", calibrated=calibrated)
    with pytest.raises(pipeline.BudgetError) as err:
        hinted(None, None, remove_ratio=0.5)
    message = str(err.value)
    assert message.startswith("--target latency --ratio 0.5 cannot be reached by keeping fewer bases at batch 1: ")
    assert says in message and message.endswith(hints) and "-0." not in message and "e+" not in message


@pytest.mark.parametrize(
    ("facts", "says"),
    [
        ({}, "(no channel removal was made)"),
        ({"latency_depth": 0.7, "latency_by": "flops", "latency_fast": False},
         "(the deepest channel removal reachable, 0.70 of the MACs, was tried)"),
        ({"latency_depth": 0.53, "latency_by": "params", "latency_fast": True},
         "(channel removal at 0.53 of the parameters, timed fast enough while searching: timings vary)"),
    ],
)  # fmt: skip
def test_a_latency_result_that_saves_too_little_says_how_it_was_made(facts, says):
    """The note named the deepest depth as tried even when the result written was one the search had timed fast
    enough and the final check did not."""
    from onnxprune.result import Report

    report = Report(facts=dict(facts))
    pipeline._latency_facts(report, 0.5, 32, {1: (1.0, 0.8), 32: (2.0, 1.5)}, False, 0.0)
    f = report.facts
    assert f["ratio_achieved"] == pytest.approx(0.25) and f["latency"]["batch"] == 32
    assert f["ratio_note"].startswith("--target latency --ratio 0.5: no result found saves that much of the time at ")
    assert f["ratio_note"].endswith("saves 0.250 (1.33x) and is written " + says)
    assert not any(k.startswith("latency_") for k in f)  # taken into the report's latency entry
    assert ("depth" in f["latency"]) == bool(facts)


def test_when_the_basis_result_cannot_be_made_the_channel_result_is_written(case, monkeypatch):
    """A basis plan that cannot reach the request (every split slower, say) is not the end of the default: the
    channel results are made and one is written; when they cannot reach it either, the basis refusal is raised."""
    from onnxprune.errors import BudgetError

    real = pipeline.prune_one

    def basis_unreachable(model, **options):
        if options["method"] == "basis":
            raise BudgetError("--ratio 0.50 cannot be reached without making the model slower (test)")
        return real(model, **options)

    monkeypatch.setattr(pipeline, "prune_one", basis_unreachable)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.8))
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    assert report.facts["method"] == "channel" and all(r["method"] == "channel" for r in report.facts["alternatives"])
    monkeypatch.setattr(pipeline, "prune_one", lambda model, **options: basis_unreachable(model, method="basis"))
    with pytest.raises(BudgetError, match="without making the model slower"):
        prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)


def test_when_neither_way_reaches_the_request_the_refusal_gives_both_limits(case, monkeypatch):
    """A new user was told to try --method channel where the default had just tried it (it reached 6.7 %): the
    refusal names what channel removal reaches and suggests nothing that was already tried."""
    from onnxprune.errors import BudgetError

    def neither(model, **options):
        if options["method"] == "basis":
            raise BudgetError(
                "--ratio 0.90 cannot be reached: at most 0.612 (test); lower --ratio, --method channel "
                "or --latency-batch 0",
                reachable=0.612,
                head="--ratio 0.90 cannot be reached: at most 0.612 (test)",
            )
        raise BudgetError("--ratio 0.90 cannot be reached: at most 0.067 of the params", reachable=0.067)

    monkeypatch.setattr(pipeline, "prune_one", neither)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.0))
    model, calib = case
    with pytest.raises(BudgetError) as e:
        prune(model, remove_ratio=0.9, method="best", calib=calib, latency_batch=1)
    said = str(e.value)
    assert "at most 0.612" in said and "channel removal, tried as well, reaches at most 0.067" in said
    assert "--method" not in said and said.endswith("lower --ratio or --latency-batch 0")
    assert e.value.reachable == pytest.approx(0.612)


def test_a_model_with_a_fixed_batch_is_timed_at_that_batch_only():
    """The summary said "1.56x at batch 32" for a recogniser whose batch is fixed at 1: it had been timed at 1."""
    from models import any_size

    assert pipeline._timed_batches(any_size(32, 32, batch=1), 1) == [1]
    assert pipeline._timed_batches(any_size(32, 32), 1) == [1, 32]
    assert pipeline._timed_batches(any_size(32, 32), 8) == [8, 32]


def test_a_result_timed_inside_the_prune_is_judged_on_both_checks():
    # the plan under the latency budget sits at the edge of the margin: its earlier check is pooled with the new one
    pooled = pipeline._pooled_speed({1: (1.0, 1.10), 32: (2.0, 1.0)}, {1: (1.0, 0.96)})
    assert pooled[1] == pytest.approx((1.0, 1.03)) and pooled[32] == (2.0, 1.0)
    assert pipeline._slower({1: (1.0, 1.10)}) and pipeline._slower({1: pooled[1]})
    assert not pipeline._slower({1: pipeline._pooled_speed({1: (1.0, 1.03)}, {1: (1.0, 0.98)})[1]})
    assert pipeline._pooled_speed({1: (1.0, 1.1)}, {}) == {1: (1.0, 1.1)}


def test_under_the_latency_budget_every_candidate_is_planned_again_and_the_most_faithful_written(case, monkeypatch):
    # handed digits ResNet-20 at 0.9: the chosen candidate's weights gave 68 % under the budget, another round's 98 %
    monkeypatch.setattr(
        pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 2.0 * r / max(ranks) for r in ranks})
    )
    checks = []

    def fake_compare(first, second, feeds, **kw):  # the first plan "slower" (both batch sizes), every later one faster
        checks.append(1)
        return (1.0, 1.5) if len(checks) <= 2 else (1.0, 0.9)

    monkeypatch.setattr(pipeline, "compare_latency", fake_compare)
    model, calib = case
    out, report = prune(model, remove_ratio=0.6, method="basis", calib=calib, latency_batch=1)
    f = report.facts
    assert f["plan_source"] == "per-layer latency budget"
    rows = f["candidates"]
    assert len(rows) >= 2 and all(r["latency_budget"] for r in rows) and sum(r["written"] for r in rows) == 1
    assert len({r["candidate"] for r in rows}) == len(rows)  # each from another round's weights
    written = next(r for r in rows if r["written"])
    assert (written["held_agreement"], written["held_cosine"]) == max(
        (r["held_agreement"], r["held_cosine"]) for r in rows
    )
    assert abs(report.facts["params_removed"] - 0.6) <= 0.01
    onnx.checker.check_model(out, full_check=True)


def test_of_results_equally_faithful_the_faster_is_written_and_cosine_breaks_a_tie_in_agreement():
    """Top-1 agreement on ~100 held-out samples ties often: the chars ResNet-20 at 0.7 (session 22) tied at 100 of
    102 for its basis result (cosine 0.996; 98.75 % test accuracy) and channel results (0.956 and 0.971; 96.33 % for
    the faster), and "at equal agreement the faster" wrote the channel one. 1 - cosine within 2x counts as equal;
    agreement within one sample too, where the rows say on how many samples they were measured."""
    speeds = [{1: (1.0, 1 / 1.04), 32: (1.0, 1 / 1.2)}, {1: (1.0, 1 / 1.78), 32: (1.0, 1 / 1.73)}]
    rows = [
        {"held_agreement": 100 / 102, "held_cosine": 0.9958, "speed_check": speeds[0]},
        {"held_agreement": 100 / 102, "held_cosine": 0.9561, "speed_check": speeds[1]},
        {"held_agreement": 100 / 102, "held_cosine": 0.9706, "speed_check": speeds[1]},
    ]
    assert pipeline._most_faithful(rows, range(3)) == [0]
    # the README example: every result agrees fully and their cosines are close: the fastest is written
    close = [dict(rows[0], held_cosine=0.9950), dict(rows[1], held_cosine=0.9930)]
    assert pipeline._most_faithful(close, range(2)) == [0, 1]
    # 1 - cosine at most 0.01 is faithful enough whatever the best (handed digits at 0.7: 0.9976 and 0.9933, 99.44 %)
    assert pipeline._most_faithful([dict(rows[0], held_cosine=0.9976), dict(rows[1], held_cosine=0.9933)], [0, 1]) == [
        0,
        1,
    ]
    # a higher agreement wins whatever the cosines
    rows[1]["held_agreement"] = 101 / 102
    assert pipeline._most_faithful(rows, range(3)) == [1]
    assert pipeline._most_faithful(rows, [0, 2]) == [0]
    # on a known number of samples, one disagreeing sample more is a tie: cosine decides (chars MobileNetV2 at 0.7,
    # session 22: basis 102 / 102 at 0.973, 97.67 % test accuracy; channel 101 / 102 at 0.982, 98.25 %)
    mobilenet = [
        {"held_agreement": 1.0, "held_cosine": 0.9732, "held_samples": 102, "speed_check": speeds[0]},
        {"held_agreement": 101 / 102, "held_cosine": 0.9817, "held_samples": 102, "speed_check": speeds[1]},
        {"held_agreement": 94 / 102, "held_cosine": 0.9990, "held_samples": 102, "speed_check": speeds[1]},
    ]
    assert pipeline._most_faithful(mobilenet, range(3)) == [0, 1]  # both within 2x: the faster is written
    mobilenet[0]["held_cosine"] = 0.95
    assert pipeline._most_faithful(mobilenet, range(3)) == [1]
    mobilenet[1]["held_agreement"] = 100 / 102  # two samples more: no longer a tie
    assert pipeline._most_faithful(mobilenet, range(3)) == [0]


def test_a_refused_result_is_not_marked_written_and_the_refusal_names_it(monkeypatch):
    """ddddocr at 0.3 (a new user, session 22): the guard refused, yet the report's basis row read "written": true,
    and the refusal did not say which of the three results it had judged."""
    from onnxprune.errors import GuardError
    from onnxprune.result import Report

    def made(model, *, remove_ratio, **options):
        rows = [
            {"method": m, "written": m == "basis", "held_agreement": a, "held_cosine": 0.99, "held_samples": 13}
            for m, a in (("basis", 12 / 13), ("channel", 1 / 13))
        ]
        fidelity = {"out": {"sequence_agreement": 12 / 13, "cosine": 0.99, "relative_error": 0.1}}
        return None, Report(facts={"method": "basis", "fidelity": fidelity, "alternatives": rows, "candidates": [1, 2]})

    monkeypatch.setattr(pipeline, "prune", made)
    with pytest.raises(GuardError) as refused:
        pipeline.prune_guarded(None, remove_ratio=0.3, calib={"x": np.zeros((1, 1))})
    assert "held-out sequence agreement of the basis result (chosen among 2 made)" in str(refused.value)
    assert not any(r["written"] for r in refused.value.report.facts["alternatives"])


def test_a_basis_result_made_quickly_is_always_compared(case, monkeypatch):
    """Channel results cost a run each; below `CLEAR_AFTER_S` they are made even beside a clearly faster, faithful
    basis result (handed digits ResNet-20 at 0.7: basis 1.14x / 1.30x alone, channel 1.58x / 1.91x, both 99.44 %)."""
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.5 if _split(b) else 0.6))
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    methods = [r["method"] for r in report.facts["alternatives"]]
    assert methods[0] == "basis" and methods[1:] and set(methods[1:]) == {"channel"}


def test_a_clearly_faster_basis_result_is_written_alone_only_when_every_held_out_sample_agrees():
    """chars MobileNetV2 at 0.7: a basis result 1.14x / 1.15x faster, at 97.67 % test accuracy, was written without a
    channel result beside it (98.25 %): a clearly faster result is written alone only when it is also faithful."""
    full = {"logits": {"top1_agreement": 1.0, "cosine": 0.995, "relative_error": 0.1}}
    assert pipeline._faithful_enough(full)
    assert not pipeline._faithful_enough({"logits": dict(full["logits"], top1_agreement=99 / 102)})
    assert not pipeline._faithful_enough({"logits": dict(full["logits"], cosine=0.98)})
    assert pipeline._faithful_enough({"features": {"cosine": 0.995, "relative_error": 0.1}})  # no class scores
    assert not pipeline._faithful_enough({"features": {"cosine": 0.98, "relative_error": 0.2}})
    assert not pipeline._faithful_enough({})


@pytest.mark.parametrize("confirmed_time, confirmed", [(0.99, True), (1.08, False)])
def test_a_more_faithful_result_timed_slower_is_timed_again_before_it_is_turned_down(
    monkeypatch, confirmed_time, confirmed
):
    """The chars ResNet-20's basis result (1.000 on fit samples) was turned down for a channel result (0.984) on a
    0.5 s check that timed it 1.11x at batch 1, where timed alone it was not slower: the most faithful result
    is timed again, longer, at the batches it was slower at, and that timing decides."""
    calls = []

    def fake(a, b, feeds, *, threads=0, seconds=None):
        calls.append((feeds["x"].shape[0], seconds))
        return (1.0, confirmed_time)

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    rows = [
        {"held_agreement": 1.0, "speed_check": {1: (1.0, 1.11), 32: (1.0, 0.9)}},
        {"held_agreement": 0.984, "speed_check": {1: (1.0, 0.7), 32: (1.0, 0.6)}},
    ]
    feeds = {b: {"x": np.zeros((b, 3))} for b in (1, 32)}
    pipeline._confirm_slower(rows, [("basis", None), ("channel", None)], None, feeds, 0)
    assert calls == [(1, pipeline.CONFIRM_SECONDS)]  # only the batch it was slower at, timed longer
    assert rows[0]["speed_confirmed"] and rows[0]["speed_check"][1] == (1.0, confirmed_time)
    assert pipeline._slower(rows[0]["speed_check"]) != confirmed
    calls.clear()
    tied = [{"held_agreement": 0.984, "speed_check": {1: (1.0, 1.11)}}, rows[1]]
    pipeline._confirm_slower(tied, [None, None], None, feeds, 0)  # no more faithful: nothing timed again
    assert not calls and "speed_confirmed" not in tied[0]


def test_under_a_latency_target_a_more_faithful_result_short_of_the_time_is_timed_again(monkeypatch):
    """`--target latency`: the channel result with measured sensitivity agreed better on fit samples (0.984 against
    0.969) but a short check under load timed it saving 43 % for a request of 50 %: it is timed again, longer, at
    the latency batch alone, before the less faithful one is written."""
    calls = []

    def fake(a, b, feeds, *, threads=0, seconds=None):
        calls.append((feeds["x"].shape[0], seconds))
        return (1.0, 0.48)

    monkeypatch.setattr(pipeline, "compare_latency", fake)
    rows = [
        {"held_agreement": 0.969, "speed_check": {32: (1.0, 0.48)}},
        {"held_agreement": 0.984, "speed_check": {32: (1.0, 0.57)}},
    ]
    feeds = {32: {"x": np.zeros((32, 3))}}
    short = lambda row: [32] if 1 - row["speed_check"][32][1] < 0.49 else []  # noqa: E731
    pipeline._confirm_slower(rows, [None, ("channel", None)], None, feeds, 0, short)
    assert calls == [(32, pipeline.CONFIRM_SECONDS)] and rows[1]["speed_confirmed"] and not short(rows[1])


def test_when_no_budget_buys_speed_the_note_names_the_plan_written(case, monkeypatch):
    """Every plan measured slower: the plan of best fidelity is written, and the note names that plan, not the plan
    of least predicted error it started from (a new user read the first as the one written)."""
    monkeypatch.setattr(
        pipeline, "layer_latency", lambda *, ranks, **kw: (1.0, {r: 2.0 * r / max(ranks) for r in ranks})
    )
    monkeypatch.setattr(pipeline, "compare_latency", lambda first, second, feeds, **kw: (1.0, 1.5))
    monkeypatch.setattr(pipeline, "SELECT_BUDGET_S", 1e9)
    model, calib = case
    _, report = prune(model, remove_ratio=0.6, method="basis", calib=calib, latency_batch=1)
    f = report.facts
    written = next(r["candidate"] for r in f["candidates"] if r["written"])
    assert f["plan_source"] == f"candidate {written} of 3"
    assert "buys no speed" in f["plan_note"] and f["plan_note"].endswith(
        f"written (candidate {written} of 3, "
        + (
            "planned by predictions alone)"
            if written == 0
            else f"after {written} round{'s' if written > 1 else ''} of measured sensitivity)"
        )
    )


def test_an_overhead_search_stops_when_even_the_largest_overhead_measures_slower():
    """Larger per-split overheads keep fewer layers split; when the largest still measures slower no overhead can
    help, and the search ends after that one timing instead of `BUDGET_STEPS` more."""
    made = []

    def make(knob):
        made.append(knob)
        return knob

    slower = lambda allocation: {1: (1.0, 1.2)}  # noqa: E731
    assert pipeline._bisect_no_slower(make, slower, 0.0, 4.0, None, larger_is_faster=True) is None
    assert made == [4.0]
    made.clear()
    faster_above_1 = lambda allocation: {1: (1.0, 0.9 if allocation >= 1.0 else 1.2)}  # noqa: E731
    found = pipeline._bisect_no_slower(make, faster_above_1, 0.0, 4.0, None, larger_is_faster=True)
    assert made[0] == 4.0 and len(made) == 1 + pipeline.BUDGET_STEPS and 1.0 <= found[0] < 1.5
    only_the_largest = lambda allocation: {1: (1.0, 0.9 if allocation >= 4.0 else 1.2)}  # noqa: E731
    assert pipeline._bisect_no_slower(make, only_the_largest, 0.0, 4.0, None, larger_is_faster=True)[0] == 4.0


def test_a_latency_result_faster_than_asked_says_so():
    """`--target latency --ratio 0.5` wrote a result saving 0.560 of the time with no `ratio` line (a new user)."""
    from onnxprune.result import Report

    report = Report()
    report.facts.update({"latency_depth": 0.7, "latency_by": "flops"})
    pipeline._latency_facts(report, 0.5, 32, {32: (1.0, 0.44)}, True, 0.0)
    assert report.facts["ratio_note"].startswith("--target latency --ratio 0.5: the result written saves 0.560")
    assert "6.0 points more than asked" in report.facts["ratio_note"] and "MACs" in report.facts["ratio_note"]
    close = Report()
    pipeline._latency_facts(close, 0.5, 32, {32: (1.0, 0.495)}, True, 0.0)
    assert "ratio_note" not in close.facts


def test_when_the_basis_result_cannot_be_made_the_summary_says_why(case, monkeypatch, capsys):
    """`--target latency` with the basis plan refused: the `chosen` line listed only channel results, and a new user
    could not tell why the basis result was missing."""

    from onnxprune.cli import _print_summary
    from onnxprune.errors import BudgetError

    def refused(*args, **kwargs):
        raise BudgetError("no basis plan saves that much; try channels", head="no basis plan saves that much")

    monkeypatch.setattr(pipeline, "_basis_or_joint", refused)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.45))
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", target="latency", calib=calib, latency_batch=1)
    assert report.facts["basis_not_made"] == "no basis plan saves that much"
    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    chosen = summary_item(capsys.readouterr().out, "chosen")
    assert "basis: not made (no basis plan saves that much)\n          channel" in chosen
    validate_report(report.to_dict("in.onnx", "out.onnx"))


def test_a_slower_result_that_keeps_the_floor_is_chosen_over_faster_ones_the_guard_refuses():
    """Chars ResNet-20 at 0.9 (session 23): the channel results no slower agreed on 60 and 75 % of the held-out
    samples, the basis result (0.81x at batch 1) on 94 %: with --force the 75 % one was written (75.38 % test
    accuracy). No slower and keeping the floor first; else keeping it; else fidelity decides among all."""
    slow, fast = {1: (1.0, 1.23), 32: (1.0, 0.93)}, {1: (1.0, 0.73), 32: (1.0, 0.52)}
    row = lambda agreement, speed: {"held_agreement": agreement, "held_cosine": 0.9, "speed_check": speed}  # noqa: E731
    assert pipeline._choice_pool([row(0.99, slow), row(0.97, fast), row(0.80, fast)], 0.05) == [1]
    assert pipeline._choice_pool([row(0.99, slow), row(0.80, fast)], 0.05) == [0]
    assert pipeline._choice_pool([row(0.99, slow), row(0.80, fast)], 0.25) == [1]  # the user's --max-drop
    resnet20 = [row(0.941, slow), row(0.598, fast), row(0.755, fast)]
    pool = pipeline._choice_pool(resnet20, 0.05)
    assert pool == [0, 1, 2] and pipeline._most_faithful(resnet20, pool) == [0]
    assert pipeline._choice_pool([{"speed_check": slow}], 0.05) == [0]  # one result, not compared: written


@pytest.mark.parametrize("holds", [True, False])
def test_counts_rounded_to_8_are_made_too_when_no_result_at_the_vector_width_keeps_the_floor(case, monkeypatch, holds):
    monkeypatch.setattr(pipeline, "simd_width", lambda: 16)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.2 if _split(b) else 0.8))
    monkeypatch.setattr(pipeline, "_holds", lambda rows, max_drop: holds)
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    widths = [r["round_to"] for r in report.facts["alternatives"] if r["method"] == "channel"]
    # (one of the two at 16 can land more than 3 points past the request in steps of 16 and is then not compared)
    assert widths == sorted(widths, reverse=True) and set(widths) == ({16} if holds else {16, 8})


def test_when_the_basis_result_measures_slower_ranks_beside_whole_channels_are_made_and_can_be_written(
    case, monkeypatch, capsys
):
    """Chars ResNet-20 at 0.9, batch 1: the basis result 0.79x (97.25 % test accuracy), every channel result under
    0.70 held-out agreement; ranks and whole channels in one knapsack 1.03x at 0.951 (92.83 %), written."""
    from onnxprune.cli import _print_summary

    made = pipeline.prune_one

    def tagged(model, **options):  # the joint result is marked, so the fake timing below can tell it apart
        out, report = made(model, **options)
        if options.get("channel_options"):
            onnx.helper.set_model_props(out, {"joint": "1"})
        return out, report

    def fake(a, b, feeds, **kw):
        joint = any(p.key == "joint" for p in b.metadata_props)
        return (1.0, 0.9 if joint else 1.3 if _split(b) else 0.8)

    monkeypatch.setattr(pipeline, "prune_one", tagged)
    monkeypatch.setattr(pipeline, "compare_latency", fake)
    monkeypatch.setattr(pipeline, "_holds", lambda rows, max_drop: any(r.get("channel_options") for r in rows))
    monkeypatch.setattr(
        pipeline,
        "_choice_pool",
        lambda rows, max_drop: [i for i, r in enumerate(rows) if r.get("channel_options")] or list(range(len(rows))),
    )
    model, calib = case
    out, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    joint = [r for r in rows if r.get("channel_options")]
    assert len(joint) == 1 and joint[0]["method"] == "basis" and joint[0]["written"] and "held_agreement" in joint[0]
    assert report.facts["channel_options"].startswith("the basis result measured slower")
    validate_report(report.to_dict())
    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    said = capsys.readouterr().out
    assert "with whole channels beside the ranks (the basis result measured slower)" in said and "(written)" in said
    assert "(method best: basis (ranks beside whole channels) result written, " in said.splitlines()[0]
    onnx.checker.check_model(out, full_check=True)


def test_a_basis_result_no_slower_makes_no_joint_result(case, monkeypatch):
    monkeypatch.setattr(pipeline, "CLEAR_AFTER_S", 1e9)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.9))
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    assert not any(r.get("channel_options") for r in report.facts["alternatives"])


def test_when_no_result_keeps_the_floor_the_basis_result_planned_by_parameters_is_made_too(case, monkeypatch, capsys):
    from onnxprune.cli import _print_summary

    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 1.2 if _split(b) else 0.8))
    monkeypatch.setattr(pipeline, "_holds", lambda rows, max_drop: False)
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    assert [r.get("speed_free", False) for r in rows] == [False] * (len(rows) - 1) + [True]
    assert rows[-1]["method"] == "basis" and "held_agreement" in rows[-1] and sum(r["written"] for r in rows) == 1
    validate_report(report.to_dict())
    _print_summary(report, Path("in.onnx"), Path("out.onnx"), verbose=False)
    assert "basis planned by parameters alone (no result above kept the guard's floor)" in capsys.readouterr().out


def test_a_basis_result_alone_that_fails_the_floor_is_compared_with_the_one_planned_by_parameters(case, monkeypatch):
    """No channel result reached the request and the basis result planned under the latency budget fails the floor
    (PP-OCRv4's recogniser at 0.3: every layer that measured no faster stayed whole, the CTC head took rank 16 of 120,
    3 % of held-out strings read the same): the one planned by parameters alone is made and compared too."""
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: (1.0, 0.97))
    monkeypatch.setattr(pipeline, "_holds", lambda rows, max_drop: False)
    _channel_unreachable(monkeypatch)
    model, calib = case
    _, report = prune(model, remove_ratio=0.5, method="best", calib=calib, latency_batch=1)
    rows = report.facts["alternatives"]
    assert [(r["method"], r.get("speed_free", False)) for r in rows] == [("basis", False), ("basis", True)]
    assert all("held_agreement" in r for r in rows) and sum(r["written"] for r in rows) == 1
    validate_report(report.to_dict())


def test_a_guard_trial_stops_at_the_first_result_that_keeps_the_floor(case, monkeypatch):
    """The guard's bisection asks only whether a ratio holds; the result written holds whenever one made does. A trial
    whose basis result keeps the floor is returned untimed, no channel result made (PP-OCRv6's recogniser: timing
    was 440 of a refusal's 1020 s)."""
    timed = []
    monkeypatch.setattr(pipeline, "CLEAR_AFTER_S", 0.0)
    monkeypatch.setattr(pipeline, "compare_latency", lambda a, b, feeds, **kw: timed.append(b) or (1.0, 1.0))
    model, calib = case
    out, report = prune(model, remove_ratio=0.3, method="best", calib=calib, latency_batch=1, holds_only=True)
    assert report.facts["method"] == "basis" and "alternatives" not in report.facts
    assert pipeline._agreement(report)[0] >= 0.95
    assert len(timed) <= 4  # the basis plan's own checks under its latency budget, none of the result
    _, full = prune(model, remove_ratio=0.3, method="best", calib=calib, latency_batch=1)
    assert len(full.facts["alternatives"]) > 1 and any(r["written"] for r in full.facts["alternatives"])


def test_a_guard_trial_under_a_latency_target_stops_at_the_first_result_that_saves_the_time_and_holds(
    case, monkeypatch
):
    """The guard asks only whether the result written would hold: one that saves the time and holds answers it (the
    PP-OCR direction classifier's refusal at 0.3 of the time took 6.5 minutes, every trial making every result)."""
    from onnxprune.budget import count

    monkeypatch.setattr(  # a split model saves nothing; a channel-pruned one its share of the MACs
        pipeline,
        "compare_latency",
        lambda a, b, feeds, **kw: (1.0, 1.0) if _split(b) else (1.0, count(b)[1] / count(a)[1]),
    )
    searches = []
    search = pipeline._channel_for_latency
    monkeypatch.setattr(pipeline, "_channel_for_latency", lambda *a, **k: searches.append(1) or search(*a, **k))
    model, calib = case
    options = dict(method="best", target="latency", calib=calib, latency_batch=1, max_drop=0.5)
    _, trial = prune(model, remove_ratio=0.3, holds_only=True, **options)
    assert len(searches) == 1 and trial.facts["method"] == "channel"  # the first search's result held
    searches.clear()
    _, report = prune(model, remove_ratio=0.3, **options)
    assert len(searches) >= 2 and len(report.facts["alternatives"]) >= 2  # a written result: every one compared
