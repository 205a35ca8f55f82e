"""Calibration hygiene: a seeded, stratified held-out split, samples of any size, the batch the model accepts."""

import json
import logging
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
from models import any_size, chain, per_run_state, streaming_state
from onnx import TensorProto, helper, numpy_helper

from onnxprune import pipeline
from onnxprune.calibration.data import Samples, batch_axes, load_calibration
from onnxprune.calibration.runner import run_batches, split_calibration, split_held_out
from onnxprune.cli import main
from onnxprune.pipeline import prune
from onnxprune.testing import ort_run, random_feeds

EXAMPLE = Path(__file__).parent.parent / "examples"


def run(args, capsys):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_held_out_is_a_seeded_shuffle_not_the_tail():
    kind = np.repeat([0, 1], [80, 20])  # a file sorted by kind: upright crops first, flipped ones last
    data = {"x": kind[:, None].astype(np.float32)}
    fit, held = split_held_out(data, seed=0)
    assert (len(fit), len(held)) == (80, 20)
    assert sorted(np.concatenate([fit.index, held.index]).tolist()) == list(range(100))
    assert 0 < kind[held.index].sum() < 20  # both kinds held out; the tail would be all of kind 1
    np.testing.assert_array_equal(held.groups[0][1]["x"][:, 0], kind[held.index])  # arrays follow the index
    np.testing.assert_array_equal(split_held_out(data, seed=0)[1].index, held.index)
    assert not np.array_equal(np.sort(split_held_out(data, seed=1)[1].index), np.sort(held.index))


@pytest.mark.parametrize("seed", range(6))
def test_stratified_held_out_takes_each_class_share(seed):
    sizes = [47, 31, 13, 6, 3]
    classes = np.repeat(np.arange(5), sizes)  # sorted by class, as files often are
    data = {"x": np.arange(100, dtype=np.float32)[:, None]}
    _, held = split_held_out(data, seed=seed, strata=classes)
    counts = np.bincount(classes[held.index], minlength=5)
    assert len(held) == 20
    assert np.all(np.abs(counts - 0.2 * np.array(sizes)) < 1), counts  # each class its share, rounded up or down


def test_split_reports_the_classes_the_held_out_part_covers():
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    x = np.load(EXAMPLE / "digits_calib.npy")[:150]
    fit, held, facts = split_calibration(model, {"image": x}, seed=0)
    top1 = run_batches(model, {"image": x})["logits"].argmax(1)
    assert (len(fit), len(held)) == (120, 30)
    assert facts["class_output"] == "logits"
    assert facts["classes_predicted"] == len(np.unique(top1))
    assert facts["fidelity_classes"] == len(np.unique(top1[held.index])) == facts["classes_predicted"]


def test_the_original_top1_is_run_once_per_model_and_data(monkeypatch):
    from onnxprune.calibration import runner

    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    x = np.load(EXAMPLE / "digits_calib.npy")[:40]
    calls = []
    real = runner._top1
    monkeypatch.setattr(runner, "_top1", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(runner, "_TOP1", {})
    first = split_calibration(model, {"image": x}, seed=0)
    again = split_calibration(model, {"image": x.copy()}, seed=1)  # another seed, the same predictions
    assert len(calls) == 1
    assert np.array_equal(first[0].index, split_calibration(model, {"image": x}, seed=0)[0].index)
    assert again[2]["classes_predicted"] == first[2]["classes_predicted"]
    changed = x.copy()
    changed[0, 0, 0, 0] += 1.0
    split_calibration(model, {"image": changed}, seed=0)
    assert len(calls) == 2


def test_the_original_outputs_are_read_back_for_the_fidelity_of_a_subset(monkeypatch):
    """The split runs the original on every sample; the held-out fidelity then reads the original's outputs back
    instead of running it again, and measures exactly what a fresh run measures."""
    from onnxprune.calibration import runner

    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    data = Samples.from_arrays({"image": np.load(EXAMPLE / "digits_calib.npy")[:40]})
    pruned = prune(model, remove_ratio=0.3)[0]
    monkeypatch.setattr(runner, "_TOP1", {})
    monkeypatch.setattr(runner, "_REFERENCE", {})
    monkeypatch.setattr(runner, "REFERENCE_BYTES", 0)  # nothing remembered: the original runs again
    fresh = runner.fidelity(model, pruned, split_calibration(model, data, seed=0)[1], batch_size=7)
    assert not runner._REFERENCE
    monkeypatch.setattr(runner, "REFERENCE_BYTES", 1 << 20)
    runs = []
    real = runner.stream
    monkeypatch.setattr(runner, "stream", lambda m, *a, **k: runs.append(m) or real(m, *a, **k))
    monkeypatch.setattr(runner, "_TOP1", {})
    monkeypatch.setattr(runner, "_REFERENCE", {})
    held = split_calibration(model, data, seed=0)[1]
    assert runs == [model]  # the split's top-1
    again = runner.fidelity(model, pruned, held, batch_size=7)
    assert runs == [model, pruned]
    assert again == fresh
    other = Samples.from_arrays({"image": np.load(EXAMPLE / "digits_calib.npy")[:40]})  # other data: run
    runner.fidelity(model, pruned, other, batch_size=7)
    assert runs[2:] == [pruned, model]


def _pages(folder: Path, sizes, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i, (n, h, w) in enumerate(sizes):
        np.savez(folder / f"page{i:02d}.npz", x=rng.standard_normal((n, 3, h, w)).astype(np.float32))


def test_samples_of_different_sizes_stream_shape_by_shape(tmp_path):
    _pages(tmp_path / "pages", [(3, 16, 16), (2, 16, 24), (4, 16, 16), (1, 24, 8)])
    data = load_calibration(tmp_path / "pages", any_size())
    assert len(data) == 10 and [len(i) for i, _ in data.groups] == [7, 2, 1]
    np.testing.assert_array_equal(data.index, [0, 1, 2, 5, 6, 7, 8, 3, 4, 9])
    shapes = [b["x"].shape for b in data.batches(4)]
    assert shapes == [(4, 3, 16, 16), (3, 3, 16, 16), (2, 3, 16, 24), (1, 3, 24, 8)]
    fit, held = split_held_out(data, seed=0)
    assert sorted(np.concatenate([fit.index, held.index]).tolist()) == list(range(10)) and len(held) == 2


def _peaked(model: onnx.ModelProto, by: float = 1e3) -> onnx.ModelProto:
    """`model` with its output multiplied by `by` (flat logits of random weights made as peaked as trained ones)."""
    from onnx import helper

    out = model.graph.output[0].name
    model.graph.node[-1].output[0] = f"{out}/raw"
    model.graph.initializer.append(numpy_helper.from_array(np.array(by, np.float32), "by"))
    model.graph.node.append(helper.make_node("Mul", [f"{out}/raw", "by"], [out]))
    return model


def test_a_folder_of_pages_of_different_sizes_prunes(tmp_path, capsys):
    model, out, rep = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    onnx.save(_peaked(any_size()), model)  # logits as peaked as a trained classifier's: its top-1 is a class
    _pages(tmp_path / "pages", [(6, 16, 16), (5, 16, 24), (6, 16, 16), (3, 24, 8)])
    args = [model, out, "--ratio", "0.3", "--calib", tmp_path / "pages", "--latency-batch", "0", "--report", rep]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    facts = json.loads(rep.read_text())
    assert facts["fidelity_samples"] == 4 and 0 <= facts["fidelity"][facts["class_output"]]["top1_agreement"] <= 1
    assert facts["macs_shape"] == {"x": [1, 3, 16, 16]} and facts["macs_shape_source"] == "calibration data"
    assert "covering" in stdout and "at x:1x3x16x16 (calibration data)" in stdout
    onnx.checker.check_model(onnx.load(out), full_check=True)


def test_a_model_with_a_fixed_batch_of_one_runs_at_that_batch(tmp_path, capsys):
    model, out, rep, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "r.json", tmp_path / "c.npy"
    onnx.save(any_size(8, 8, batch=1), model)
    np.save(calib, np.random.default_rng(0).standard_normal((40, 3, 8, 8)).astype(np.float32))
    args = [model, out, "--ratio", "0.3", "--calib", calib, "--batch-size", "32", "--latency-batch", "0"]
    code, _, err = run([*args, "--report", rep], capsys)
    assert code == 0, err  # batches of 32 would end in onnxruntime's "Got invalid dimensions for input"
    assert json.loads(rep.read_text())["fidelity_samples"] == 8


@pytest.mark.parametrize("n", [3, 7])
def test_data_that_cannot_fill_a_fixed_batch_is_one_line(tmp_path, capsys, n):
    model, out, calib = tmp_path / "m.onnx", tmp_path / "o.onnx", tmp_path / "c.npy"
    onnx.save(any_size(8, 8, batch=4), model)
    np.save(calib, np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32))
    code, _, err = run([model, out, "--ratio", "0.3", "--calib", calib], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "batches of exactly 4" in err, err
    assert not out.exists()


def test_a_fixed_batch_of_four_takes_whole_batches(tmp_path):
    x = np.random.default_rng(0).standard_normal((42, 3, 8, 8)).astype(np.float32)
    pruned, report = prune(any_size(8, 8, batch=4), remove_ratio=0.3, calib={"x": x}, latency_batch=0)
    assert report.facts["fidelity_samples"] == 8  # 40 samples fill batches of 4; 8 of them held out


def test_few_fit_samples_for_the_widest_refitted_layer_warn_once(caplog):
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    x = np.load(EXAMPLE / "digits_calib.npy")
    options = dict(remove_ratio=0.5, method="channel", criterion="l2", latency_batch=0)
    with caplog.at_level(logging.WARNING):
        prune(model, calib={"image": x[:40]}, **options)
    warned = [r.getMessage() for r in caplog.records if "fit samples are few" in r.getMessage()]
    assert len(warned) == 1 and "32 fit samples" in warned[0] and "(its input lost channels;" in warned[0], warned
    k = int(re.search(r"K=(\d+)", warned[0])[1])
    assert 4 * 32 < k <= 864  # the widest refitted layer's pruned input width Ci*kh*kw (the largest is 96*3*3)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        prune(model, calib={"image": x[:300]}, **options)  # 240 fit samples >= 864 / 4
    assert not [r for r in caplog.records if "fit samples are few" in r.getMessage()]


def test_seed_drives_the_split_and_the_result(tmp_path, capsys):
    model, calib = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(chain(), model)
    np.save(calib, np.random.default_rng(0).standard_normal((60, 3, 8, 8)).astype(np.float32))
    errors = []
    for i, seed in enumerate((0, 0, 1)):
        rep = tmp_path / f"r{i}.json"
        args = [model, tmp_path / f"o{i}.onnx", "--ratio", "0.5", "--calib", calib, "--latency-batch", "0", "--force"]
        code, _, err = run([*args, "--report", rep, "--seed", seed], capsys)
        assert code == 0, err
        facts = json.loads(rep.read_text())
        errors.append(facts["fidelity"][chain().graph.output[0].name]["relative_error"])
    assert errors[0] == errors[1] and errors[0] != errors[2]


def test_calib_size_is_a_seeded_subset_and_labels_follow_it():
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    path = EXAMPLE / "digits_calib.npy"
    x = np.load(path)
    a = load_calibration(path, model, limit=50, seed=0)
    b = load_calibration(path, model, limit=50, seed=1)
    assert len(a) == 50 and a.total == len(x) and not np.array_equal(a.index, b.index)
    assert a.index.max() >= 50  # not the head of the file
    np.testing.assert_array_equal(a.groups[0][1]["image"], x[a.index])


def test_samples_take_keeps_shape_groups_and_positions():
    s = Samples([(np.array([0, 2]), {"x": np.zeros((2, 1, 2))}), (np.array([1, 3, 4]), {"x": np.ones((3, 1, 3))})])
    t = s.take(np.array([4, 0, 2]))
    assert [len(i) for i, _ in t.groups] == [2, 1]
    np.testing.assert_array_equal(t.index, [4, 1, 0])
    assert [b["x"].shape for b in t.batches(8)] == [(2, 1, 3), (1, 1, 2)]


def test_only_outputs_shaped_like_class_scores_stratify():
    from onnxprune.calibration.runner import class_scores

    assert class_scores(np.zeros((4, 10), np.float32)).shape == (4, 10)
    assert class_scores(np.zeros((4, 1, 10), np.float32)).shape == (4, 10)
    for other in (np.zeros((4, 10, 7, 7), np.float32), np.zeros((4, 25, 37), np.float32), np.zeros((4, 1))):
        assert class_scores(other) is None  # feature maps, a recogniser's per-step scores, one score
    b_model = any_size()
    features = onnx.helper.make_tensor_value_info(b_model.graph.node[2].output[0], onnx.TensorProto.FLOAT, None)
    del b_model.graph.output[:]
    b_model.graph.output.append(features)  # a model whose only output is a feature map
    x = np.random.default_rng(0).standard_normal((10, 3, 8, 8)).astype(np.float32)
    fit, held, facts = split_calibration(b_model, {"x": x}, seed=0)
    assert facts == {} and (len(fit), len(held)) == (8, 2)


def test_a_time_major_sequence_output_does_not_stratify_the_split():
    """Recognisers output [T, N, C] (time first): one row per time step, not per sample, so not class scores."""
    from onnx import TensorProto, helper

    from onnxprune.calibration.runner import split_calibration, top1

    graph = helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["y"], perm=[1, 0, 2])],
        "seq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 7])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, "N", 7])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    data = {"x": np.random.default_rng(0).standard_normal((12, 5, 7)).astype(np.float32)}
    assert top1(model, data, batch_size=1) is None  # with N = 1 the output is [5, 1, 7]: five rows, one sample
    fit, held, facts = split_calibration(model, data, seed=0, batch_size=1)
    assert len(fit) + len(held) == 12 and facts == {}


def test_one_calibration_sample_is_refused_in_one_line(tmp_path, capsys):
    """One sample leaves none to check the result on: exit 2, one line, nothing written (was: exit 0, no fidelity
    line, and a model at 9.7 % test accuracy)."""
    out = tmp_path / "o.onnx"
    np.save(tmp_path / "one.npy", np.load(EXAMPLE / "digits_calib.npy")[:1])
    code, _, err = run([EXAMPLE / "digits_resnet.onnx", out, "--ratio", "0.5", "--calib", tmp_path / "one.npy"], capsys)
    assert code == 2 and "at least 2 are needed" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_calibration_the_model_gives_one_class_for_warns(tmp_path, capsys):
    """Blank images (or noise): the original predicts one class for all of them, so 100 % agreement on them says
    nothing; the summary says so."""
    np.save(tmp_path / "blank.npy", np.zeros((30, 1, 16, 16), np.float32))
    args = [EXAMPLE / "digits_resnet.onnx", tmp_path / "o.onnx", "--ratio", "0.3", "--calib", tmp_path / "blank.npy"]
    code, stdout, err = run([*args, "--latency-batch", "0", "--force"], capsys)
    assert code == 0, err
    assert "covering 1 of 1 predicted classes" in stdout and "predicts one class for every calibration" in stdout


def test_sequence_outputs_are_judged_by_the_decoded_sequence_per_sample():
    """A recogniser's per-position class scores: agreement is whole decoded sequences per sample (CTC), not frames,
    in either layout; cosine is per sample. A detector-like Concat output is not a sequence of class scores."""
    from models import recurrent_head

    from onnxprune.calibration.runner import decode, fidelity, sequence_outputs, sequences

    assert decode(np.array([0, 3, 3, 0, 3, 5, 5, 0]), blank=0) == (3, 3, 5)
    x = np.zeros((7, 2, 4), np.float32)  # time first, 2 samples
    assert sequences(x, 2).shape == (2, 7, 4) and sequences(x[:, :1], 1).shape == (1, 7, 4)
    assert sequences(np.zeros((2, 4), np.float32), 2) is None
    flat = recurrent_head("LSTM")
    out = flat.graph.output[0].name
    assert sequence_outputs(flat) == {out: 10}
    data = {"x": random_feeds(flat, batch=12, seed=4)["x"]}
    # random weights give flat frames, as a hidden state [B, S, D] has: judged by cosine, not decoded as CTC (a new
    # user's MatMul output [B, 16, 1024] was refused at 0.154 "sequence agreement" with cosine 0.9992)
    hidden = fidelity(flat, flat, data, batch_size=5)[out]
    assert "sequence_agreement" not in hidden and "top1_agreement" not in hidden and hidden["cosine"] > 0.999
    assert pipeline._worst({out: hidden}) == (hidden["cosine"], "cosine")
    model = onnx.ModelProto()  # a trained recogniser's frames are peaked: the head's logits scaled up
    model.CopyFrom(flat)
    head = next(n for n in model.graph.node if n.op_type == "MatMul").input[1]
    w = next(t for t in model.graph.initializer if t.name == head)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 30, w.name))
    same = fidelity(model, model, data, batch_size=5)[out]
    assert same["sequence_agreement"] == 1.0 and same["frame_agreement"] == 1.0 and "top1_agreement" not in same
    noisy = onnx.ModelProto()
    noisy.CopyFrom(model)
    head = next(n for n in noisy.graph.node if n.op_type == "MatMul").input[1]
    w = next(t for t in noisy.graph.initializer if t.name == head)  # the head's [24, 10] weight
    arr = numpy_helper.to_array(w)
    noise = np.random.default_rng(0).normal(0, 0.5 * arr.std(), arr.shape).astype(arr.dtype)
    w.CopyFrom(numpy_helper.from_array(arr + noise, w.name))
    found = fidelity(model, noisy, data, batch_size=5)[out]
    assert found["sequence_agreement"] < found["frame_agreement"] < 1.0  # one wrong frame spoils the sequence
    assert pipeline._worst({out: found}) == (found["sequence_agreement"], "sequence agreement")


def test_a_softmax_head_whose_weights_constant_nodes_hold_is_judged_by_its_decoded_sequences():
    """PP-OCRv4's recogniser (paddle2onnx) ends in MatMul + Add + Softmax with every weight in a Constant node: the
    head was not found (its weight was not a constant until folded) and its probabilities, softmaxed again over 6 625
    classes, looked flat, so the guard judged it by cosine (0.916, 0.5 % of strings read the same in its pipeline)."""
    from models import recurrent_head

    from onnxprune.calibration.runner import SCORES_CONFIDENCE, confidence, fidelity, sequence_outputs

    rows = np.full((4, 6625), 1e-6, np.float32)
    rows[:, 0] = 1.0 - rows[:, 1:].sum(1)  # peaked probabilities: the top class holds 99.3 %
    assert np.all(confidence(rows) > 0.99)
    assert np.all(confidence(np.log(rows)) > 0.99)  # log-probabilities (LogSoftmax) as logits: the same
    model = recurrent_head("LSTM")
    out = model.graph.output[0].name
    head = next(n for n in model.graph.node if n.op_type == "MatMul")
    bias = next(n for n in model.graph.node if n.op_type == "Add" and n.input[0] == head.output[0]).input[1]
    for name, scale in ((head.input[1], 30.0), (bias, 1.0)):  # peaked frames, then the weights into Constant nodes
        t = next(t for t in model.graph.initializer if t.name == name)
        model.graph.initializer.remove(t)
        value = numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(scale), name)
        model.graph.node.insert(0, onnx.helper.make_node("Constant", [], [name], value=value))
    model.graph.node.append(onnx.helper.make_node("Softmax", [out], ["probabilities"], axis=-1))
    model.graph.output[0].name = "probabilities"
    onnx.checker.check_model(model, full_check=True)
    assert sequence_outputs(model) == {"probabilities": 10}
    data = {"x": random_feeds(model, batch=12, seed=4)["x"]}
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    probabilities = session.run(None, data)[0].reshape(-1, 10)
    assert confidence(probabilities).mean() >= SCORES_CONFIDENCE
    same = fidelity(model, model, data, batch_size=5)["probabilities"]
    assert same["sequence_agreement"] == 1.0 and pipeline._worst({"p": same})[1] == "sequence agreement"


def test_a_label_criterion_on_a_sequence_model_says_its_scores_are_per_position(caplog):
    """cmi needs one class per sample; a recogniser's peaked frames are classes per position: the warning says so
    (a new user read "no output reads as class scores" beside a CTC head whose frames were 0.86-1.00 peaked)."""
    from models import recurrent_head

    model = recurrent_head("LSTM")
    head = next(n for n in model.graph.node if n.op_type == "MatMul").input[1]
    w = next(t for t in model.graph.initializer if t.name == head)
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 30, w.name))
    data = {"x": random_feeds(model, batch=40, seed=4)["x"]}
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        pipeline.prune(model, remove_ratio=0.2, method="auto", calib=data)
    said = [r.getMessage() for r in caplog.records if "criterion energy instead of cmi" in r.getMessage()]
    assert said and "scores are per position" in said[0]


@pytest.mark.parametrize("over_2gb", [False, True], ids=["serialised", "weightless-view"])
def test_the_model_digest_follows_the_weights(over_2gb, monkeypatch):
    """The memos of the original's outputs key on the model's content; a model over 2 GB cannot be serialised in one
    piece, so its digest reads the weightless view and each weight's bytes: a changed weight changes it."""
    from onnxprune.calibration import runner

    monkeypatch.setattr(runner, "oversized", lambda m: over_2gb)
    model = onnx.load(EXAMPLE / "digits_resnet.onnx")
    same = onnx.load(EXAMPLE / "digits_resnet.onnx")
    assert runner.model_digest(model) == runner.model_digest(same)
    big = max(same.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    values = numpy_helper.to_array(big).copy()
    values.flat[0] += 1.0
    big.CopyFrom(numpy_helper.from_array(values, big.name))
    assert runner.model_digest(model) != runner.model_digest(same)


def test_flat_outputs_are_an_embedding_judged_by_cosine_not_top1():
    """[N, C] rows whose softmax is flat (a sentence embedding, pooled features) have no class in their argmax: no
    top-1 for the split, the criteria or the guard; the same rows made peaked are class scores again."""
    from onnxprune.calibration.runner import fidelity, top1

    data = {"x": np.random.default_rng(0).standard_normal((48, 3, 8, 8)).astype(np.float32)}
    flat, peaked = _peaked(chain(), 1e-3), _peaked(chain())
    assert top1(flat, data) is None and top1(peaked, data) is not None
    assert "top1_agreement" not in fidelity(flat, flat, data)[flat.graph.output[0].name]
    assert fidelity(peaked, peaked, data)[peaked.graph.output[0].name]["top1_agreement"] == 1.0


@pytest.mark.parametrize("bad", [[0.5, 1, 2, 3], [-1, 0, 1, 2], ["a", "b", "c", "d"], [np.nan, 1, 2, 3]])
def test_labels_that_are_not_class_indices_are_refused_in_one_line(bad, tmp_path):
    """A new user's labels of 0.5 or -1 were accepted: `accuracy 0.0 % -> 0.0 %`, and they steered the criterion."""
    from onnxprune.calibration.data import Samples, load_labels
    from onnxprune.errors import OnnxPruneError

    data = Samples.from_arrays({"x": np.zeros((4, 3), np.float32)})
    path = tmp_path / "labels.npy"
    np.save(path, np.array(bad))
    with pytest.raises(OnnxPruneError, match="expected class indices") as info:
        load_labels(path, data)
    assert "\n" not in str(info.value)
    np.save(path, np.array([0.0, 1.0, 2.0, 9.0]))  # whole numbers stored as floats are class indices
    assert load_labels(path, data).tolist() == [0, 1, 2, 9]


def test_labels_past_the_model_s_classes_are_refused_in_one_line(tmp_path, capsys):
    """Two new users passed labels 20-29 to a 10-class model: exit 0 and 'accuracy 0.0 % -> 0.0 %'."""
    x = np.load(EXAMPLE / "digits_calib.npy")[:60]
    np.save(tmp_path / "calib.npy", x)
    np.save(tmp_path / "labels.npy", np.arange(60) % 10 + 20)
    out = tmp_path / "o.onnx"
    args = [EXAMPLE / "digits_resnet.onnx", out, "--ratio", "0.3", "--calib", tmp_path / "calib.npy"]
    code, _, err = run([*args, "--labels", tmp_path / "labels.npy"], capsys)
    assert code == 2 and "class 29 is past the model's classes ('logits' has 10" in err and not out.exists()
    assert len(err.strip().splitlines()) == 1


def _flat_scored_classifier() -> tuple[onnx.ModelProto, dict]:
    """A plain [N, 10] classifier whose scores are flat on any input (an untrained head), and 40 random samples."""
    from models import gemm_bias2d

    model = gemm_bias2d()
    last = [n for n in model.graph.node if n.op_type == "Gemm"][-1]
    for t in model.graph.initializer:
        if t.name in last.input[1:]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1e-3, t.name))
    return model, {i.name: random_feeds(model, batch=40, seed=4)[i.name] for i in model.graph.input}


def test_a_classifier_with_flat_scores_is_not_said_to_score_per_position(caplog):
    """A plain [N, 10] classifier whose scores are flat on the data (random weights) was told its scores are per
    position, as a CTC recogniser's: the warning gives the flat scores as the reason."""
    model, data = _flat_scored_classifier()
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        pipeline.prune(model, remove_ratio=0.2, method="auto", calib=data, latency_batch=0)
    said = [r.getMessage() for r in caplog.records if "criterion energy instead of cmi" in r.getMessage()]
    assert said and "per position" not in said[0] and "class scores" in said[0]


def test_the_criterion_warning_is_given_only_for_the_result_written(caplog):
    """Method best makes channel results with the label criterion turned to energy; when the basis result is the one
    written, the warning would name a removal the user never gets (a new user on a layout detector asked about it)."""
    model, data = _flat_scored_classifier()
    with caplog.at_level(logging.WARNING, logger="onnxprune"):
        _, report = pipeline.prune(model, remove_ratio=0.2, method="best", calib=data, latency_batch=1)
    said = [r.getMessage() for r in caplog.records if "criterion energy instead of" in r.getMessage()]
    assert report.facts["method"] == "basis" and not said


def _scaled(scale) -> onnx.ModelProto:
    """x [N, 3, 40] times a constant per channel: an output holding three quantities of different scales."""
    s = numpy_helper.from_array(np.asarray(scale, np.float32).reshape(1, 3, 1), "s")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Mul", ["x", "s"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 3, 40])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 3, 40])],
        [s],
    )
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


def test_an_output_of_several_quantities_is_judged_by_its_worst_channel():
    """YOLOv8 writes boxes (up to 320) and class scores (up to 0.14) in one [N, 4 + C, anchors] output: one cosine
    over it is the boxes' (NudeNet's detector data-free at 0.3: 0.991 while its scores' was 0.17). The cosine and
    error the guard reads are now the worst channel's; the whole output's figure would have passed."""
    from onnxprune.calibration.runner import fidelity, quantity_axis

    x = np.abs(np.random.default_rng(8).standard_normal((24, 3, 40))).astype(np.float32) + 0.1
    original, pruned = _scaled([300.0, 0.1, 0.1]), _scaled([300.0, 0.1, -0.1])  # the last channel's sign flipped
    found = fidelity(original, pruned, {"x": x})["y"]
    a, b = x * np.array([300.0, 0.1, 0.1])[:, None], x * np.array([300.0, 0.1, -0.1])[:, None]
    assert float(np.sum(a * b) / np.sum(a * a)) > 0.999  # what one cosine over the whole output read
    assert found["channel_cosine"] == {"cosine": pytest.approx(-1.0), "channel": 2, "channels": 3}
    assert found["cosine"] == pytest.approx(-1.0) and found["relative_error"] == pytest.approx(2.0)
    same = fidelity(original, original, {"x": x})["y"]
    assert same["cosine"] == pytest.approx(1.0) and same["relative_error"] == pytest.approx(0.0, abs=1e-6)
    assert quantity_axis((8, 22, 2100)) == 1 and quantity_axis((8, 3549, 6)) == 2 and quantity_axis((8, 5)) is None


def test_a_state_input_batched_on_axis_1_is_fed_its_samples_there(tmp_path, capsys):
    model = streaming_state()  # x [batch, 3, 8, 8], state [2, batch, 12] -> scores [batch, 5], stateN [2, batch, 12]
    assert batch_axes(model) == {"x": 0, "state": 1, model.graph.output[0].name: 0, model.graph.output[1].name: 1}
    rng = np.random.default_rng(0)
    calib = {"x": rng.standard_normal((40, 3, 8, 8)), "state": rng.standard_normal((2, 40, 12)) * 0.5}
    calib = {k: v.astype(np.float32) for k, v in calib.items()}
    pruned, report = prune(model, remove_ratio=0.3, calib=calib, latency_batch=0)
    assert report.facts["fidelity_samples"] == 8  # 40 samples, not 2
    assert set(report.facts["fidelity"]) == {o.name for o in model.graph.output}
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(model, batch=3)
    assert feeds["state"].shape == (2, 3, 12)
    got = ort_run(pruned, feeds)
    assert got[model.graph.output[1].name].shape == (2, 3, 12)
    # fed its samples on axis 0, the state would be refused for the count, in one line that names the axes
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=calib["x"], state=np.moveaxis(calib["state"], 1, 0))
    code, _, err = run([path, out, "--ratio", "0.3", "--calib", tmp_path / "c.npz", "--latency-batch", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "'state' 1" in err, err
    assert not out.exists()


def test_a_state_input_batched_on_axis_1_drifts_on_random_inputs_of_its_layout():
    pruned, report = prune(streaming_state(), remove_ratio=0.3, latency_batch=0)
    assert report.facts["synthetic_drift"]["samples"] == pipeline.SYNTHETIC_SAMPLES
    assert report.facts["macs_shape"] == {"x": [1, 3, 8, 8], "state": [2, 1, 12]}


def test_an_input_of_fixed_dims_beside_a_batched_one_is_one_value_per_run(tmp_path, capsys):
    model = per_run_state()  # chunks x [seq, 3, 8, 8] are the LSTM's steps; its state h [2, 1, 12] comes once a run
    assert batch_axes(model)["h"] is None and batch_axes(model)["x"] == 0
    pruned, report = prune(model, remove_ratio=0.3, latency_batch=0)
    assert report.facts["synthetic_drift"]["samples"] == pipeline.SYNTHETIC_SAMPLES  # was exit 2: "found [1, 8]"
    rng = np.random.default_rng(0)
    x, h = rng.standard_normal((40, 3, 8, 8)).astype(np.float32), rng.standard_normal((2, 1, 12)).astype(np.float32)
    pruned, report = prune(model, remove_ratio=0.3, calib={"x": x, "h": h}, latency_batch=0)
    assert report.facts["fidelity_samples"] == 8
    onnx.checker.check_model(pruned, full_check=True)
    assert ort_run(pruned, {"x": x[:3], "h": h})[model.graph.output[1].name].shape == (2, 1, 12)
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save(model, path)
    np.savez(tmp_path / "c.npz", x=x, h=np.repeat(h, 40, axis=1))  # a value per sample: it takes one per run
    code, _, err = run([path, out, "--ratio", "0.3", "--calib", tmp_path / "c.npz", "--latency-batch", "0"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "input 'h'" in err and "one value" in err, err
    assert not out.exists()


def test_an_output_of_one_value_per_sample_is_judged_by_its_cosine_over_the_samples():
    """silero-vad's speech probability is [N, 1]: a cosine per sample is only the sign of its one value (1.0000
    while the pruned model's probabilities were off by 128 %). It is the cosine over the samples' values."""
    from onnxprune.calibration.runner import fidelity

    def scores(flip_magnitudes: bool) -> onnx.ModelProto:
        w = np.random.default_rng(9).standard_normal((6, 1)).astype(np.float32)
        nodes = [helper.make_node("MatMul", ["x", "w"], ["p"])]
        if flip_magnitudes:  # the same signs, unrelated magnitudes
            v = np.random.default_rng(10).standard_normal((6, 1)).astype(np.float32)
            nodes = [
                helper.make_node("MatMul", ["x", "w"], ["q"]),
                helper.make_node("MatMul", ["x", "v"], ["r"]),
                helper.make_node("Sign", ["q"], ["s"]),
                helper.make_node("Abs", ["r"], ["a"]),
                helper.make_node("Mul", ["s", "a"], ["p"]),
            ]
        inits = [numpy_helper.from_array(w, "w")] + ([numpy_helper.from_array(v, "v")] if flip_magnitudes else [])
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
            [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", 1])],
            inits,
        )
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = np.random.default_rng(11).standard_normal((64, 6)).astype(np.float32)
    found = fidelity(scores(False), scores(True), {"x": x})["p"]
    assert found["cosine"] < 0.9  # per sample it read 1.0 (every sign the same)
    assert fidelity(scores(False), scores(False), {"x": x})["p"]["cosine"] == pytest.approx(1.0)
