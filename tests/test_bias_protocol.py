"""`--bias-protocol paper` end to end: library validation, report rows, the CLI and the gRPC Validate request,
on a tiny real open_clip model and real image files (the formulas themselves are in tests/test_bias.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from surgeon.core.errors import InvalidInput
from surgeon.exporting.card import _front_matter
from surgeon.model.load import load_model
from surgeon.results.records import Plan
from surgeon.validation.validate import build_suite, markdown_report, validate
from tests.conftest import run_cli
from tests.grpc_helpers import (
    RPC_TIMEOUT,
    Code,
    Meta,
    code_of,
    meta,
    outcome,
    pb,
    wait,
)


def _bias(report: dict) -> dict:
    return next(r["metrics"] for r in report["results"] if r["task"] == "bias")


def test_paper_protocol_headlines_the_sum(tiny_default_dir, user_data):
    loaded = load_model(f"local-dir:{tiny_default_dir}", device="cpu")
    files = {"bias_data": user_data / "bias.csv", "queries": user_data / "queries.txt", "skew_k": 4}
    default = validate(loaded, build_suite(**files))
    paper = validate(loaded, build_suite(**files, protocol="paper"))
    assert set(default["summary"]) == {"mean_acc1", "max_skew@4", "ndkl"}  # unchanged for the default protocol
    metrics = _bias(paper)
    assert (metrics["protocol"], metrics["desired"]) == ("paper", "set")
    assert paper["summary"]["max_skew@4_sum"] == pytest.approx(sum(metrics["max_skew@4_per_query"]), abs=1e-5)
    assert paper["summary"]["max_skew@4"] == pytest.approx(np.mean(metrics["max_skew@4_per_query"]), abs=1e-6)
    # the set is half a, half b (p* = 1/2 either way) and an absent group at 1/k = 1/4 < 1/2 never holds the
    # maximum, so the per-query MaxSkew agrees; what the paper changes here is the headline (sum, not mean)
    assert metrics["max_skew@4_per_query"] == _bias(default)["max_skew@4_per_query"]
    assert "| bias.csv | max_skew@4_sum |" in markdown_report(paper)
    assert "max_skew@4_sum" not in markdown_report(default)
    plan = Plan({"name": "tiny", "pretrained": ""}, None, "top-k", {}, "zero", "vision", 0, (), {}, {})
    front = "\n".join(_front_matter(plan, {"after": paper}, has_onnx=False))
    assert "max_skew" not in front  # no Hub task type for bias: the card body (markdown_report) carries it
    with pytest.raises(InvalidInput, match="contradicts"):
        build_suite(**files, desired="uniform", protocol="paper")
    with pytest.raises(InvalidInput, match="unknown bias protocol"):
        build_suite(protocol="CCS")  # refused before the toy suite is built


def test_cli_bias_protocol(tiny_default_dir, user_data):
    common = ["validate", "--model", f"local-dir:{tiny_default_dir}", "--skew-k", "4"]
    common += ["--bias-data", str(user_data / "bias.csv"), "--queries", str(user_data / "queries.txt")]
    result = run_cli(*common, "--bias-protocol", "paper", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert _bias(report)["protocol"] == "paper" and "max_skew@4_sum" in report["summary"]
    for bad, message in ((["--bias-protocol", "nope"], "unknown bias protocol"), (["--desired", "uniform"], "contra")):
        refused = (
            run_cli(*common, "--bias-protocol", "paper", *bad) if bad[0] == "--desired" else run_cli(*common, *bad)
        )
        assert refused.returncode == 2 and message in refused.stderr and "Traceback" not in refused.stderr
        assert len(refused.stderr.strip().splitlines()) <= 2, refused.stderr  # the error and, at most, a hint


def test_grpc_validate_with_the_paper_protocol(stub, world):  # noqa: F811
    data = {"bias_data": "bias.csv", "queries": "queries.txt", "skew_k": 4}
    model = pb.ModelRef(model="local-dir:tiny")
    done = wait(
        stub,
        stub.Validate(
            pb.ValidateRequest(model=model, validation=pb.ValidationData(**data, bias_protocol="paper")),
            timeout=RPC_TIMEOUT,
        ),
    )
    assert meta(done).state == Meta.STATE_SUCCEEDED, done.error
    assert set(outcome(done, pb.ValidateResult).summary) == {"max_skew@4", "max_skew@4_sum", "ndkl"}
    for bad in ({"bias_protocol": "nope"}, {"bias_protocol": "paper", "desired": "uniform"}):
        request = pb.ValidateRequest(model=model, validation=pb.ValidationData(**data, **bad))
        assert code_of(lambda r=request: stub.Validate(r, timeout=RPC_TIMEOUT)) == Code.INVALID_ARGUMENT
