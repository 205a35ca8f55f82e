"""The real architectures shipped with onnx: prune at 0.5, the result is valid and runs, or the refusal explains."""

import numpy as np
import onnx
import pytest
from light_zoo import NAMES, load

from onnxprune import BudgetError
from onnxprune.pipeline import prune
from onnxprune.testing import ort_run, random_feeds


@pytest.mark.parametrize("name", NAMES)
def test_prune_half(name):
    model = load(name)
    feeds = random_feeds(model, batch=1)
    try:
        pruned, report = prune(model, remove_ratio=0.5, method="channel")
    except BudgetError as err:
        assert name == "shufflenet", f"{name}: {err}"  # channel shuffle and grouped convs block nearly everything
        assert "cannot be reached" in str(err) and "blocked" in str(err)
        return
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    onnx.checker.check_model(pruned, full_check=True)
    outputs = ort_run(pruned, feeds)
    reference = ort_run(model, feeds)
    for key, value in reference.items():
        assert outputs[key].shape == value.shape
        assert np.all(np.isfinite(outputs[key]))
    assert report.facts["blocked"], "the classifier output group is reported as blocked"


@pytest.mark.parametrize("name", ["densenet121", "inception_v2"])
def test_prune_as_shipped(name):
    """IR 3, initializers listed as graph inputs, weights as shipped: brought to a form shape inference understands
    before anything is tracked (they used to be refused, 'at most 0.003', with MACs 'removed -2280.9 %')."""
    from light_zoo import path

    model = onnx.load(path(name))
    assert model.ir_version == 3
    pruned, report = prune(model, remove_ratio=0.5, method="channel")
    assert abs(report.facts["params_removed"] - 0.5) <= 0.01
    assert 0.0 < report.facts["macs_removed"] < 1.0
    assert report.facts["macs_before"] > 10**9  # every Conv counted, not only the classifier
    onnx.checker.check_model(pruned, full_check=True)
    feeds = random_feeds(pruned, batch=1)
    assert all(np.all(np.isfinite(v)) for v in ort_run(pruned, feeds).values())
