"""Property-based fuzzing (hypothesis) of what users type and send: the CLI's numeric and range options and
every request of the gRPC service. Random strings, numbers (huge, negative, NaN, infinite) and nested
messages must give only documented exit codes / status codes, one error line, and no memory blow-up.
Derandomized: every run draws the same examples."""

from __future__ import annotations

import resource
import tracemalloc

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from surgeon.core import limits  # noqa: E402
from surgeon.core.errors import InvalidInput  # noqa: E402
from surgeon.model.decompose import parse_layers  # noqa: E402
from surgeon.model.heads import parse_heads  # noqa: E402
from tests.conftest import NO_MODEL, run_cli  # noqa: E402

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RSS_GROWTH_LIMIT_MB = 300

#: what users type: plain and huge integers, floats, NaN and infinities, words, separators, long strings
values = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70).map(str),
    st.integers(min_value=-3, max_value=300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["nan", "inf", "-inf", "1e400", "0x10", " 5", "5 ", "1_000", "", "0-999999999999", "last0"]),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20),
    st.integers(min_value=0, max_value=300_000).map(lambda n: "9" * n),
)

COMMANDS = {
    "rank": ["--n-images", "--batch-size", "--m", "--span-rank", "--checkpoint-every", "--layers"],
    "prune": ["--k", "--seed", "--seeds", "--min-ccs", "--max-acc-drop", "--max-skew", "--min-acc", "--atol"]
    + ["--skew-k", "--heads", "--n-images"],
    "sweep": ["--counts", "--seed", "--n-images", "--skew-k"],
    "validate": ["--skew-k"],
    "export": ["--atol", "--max-accuracy-drop"],
    "infer": ["--top-k", "--batch-size"],
    "serve-model": ["--http-port", "--grpc-port", "--metrics-port", "--max-batch-size", "--max-batch-time-ms"]
    + ["--threads"],
}
TARGET = {  # a valid request ends at "not found" (exit 3) right after its options were checked: no real work
    "rank": NO_MODEL,
    "prune": NO_MODEL,
    "sweep": NO_MODEL,
    "validate": NO_MODEL,
    "export": ["/nonexistent/surgeon-run"],
    "infer": ["/nonexistent/surgeon-export", "/nonexistent/image.png"],
    "serve-model": ["/nonexistent/surgeon-export"],  # refused before any port is bound
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow  # 60 hypothesis examples per verb through the CLI
@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_numeric_and_range_options(command, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    start = _rss_mb()

    @FUZZ
    @given(st.lists(st.tuples(st.sampled_from(COMMANDS[command]), values), min_size=1, max_size=4))
    def check(options):
        positional = command in ("export", "infer", "serve-model")
        args = [command, *TARGET[command]] if positional else [command]
        for name, value in options:
            args += [f"{name}={value}"]  # '=': a value starting with '-' stays a value
        if not positional:
            args += TARGET[command]
        done = run_cli(*args)
        code, err = done.returncode, done.stderr
        assert code in (2, 3), (args[:6], code, err[-500:])
        assert "Traceback" not in err and len(err) < 2000, err[-500:]

    check()
    assert list(tmp_path.iterdir()) == []  # nothing written
    assert _rss_mb() - start < RSS_GROWTH_LIMIT_MB


@FUZZ
@given(spec=values, n_layers=st.integers(min_value=1, max_value=64))
def test_layer_specs_stay_within_memory(spec, n_layers):
    tracemalloc.start()
    try:
        layers = parse_layers(spec, n_layers)
        assert all(0 <= i < n_layers for i in layers)
    except InvalidInput as err:
        assert len(str(err)) < 400
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 20 << 20


@FUZZ
@given(spec=st.one_of(values, st.lists(values, max_size=5).map(",".join)))
def test_sweep_counts_and_heads(spec):
    for parse in (limits.sweep_counts, parse_heads):
        try:
            parse(spec)
        except InvalidInput as err:
            assert len(str(err)) < 400


# ---- gRPC: every request type of the service, built from its descriptor ----

grpc = pytest.importorskip("grpc")

from google.longrunning import operations_pb2, operations_pb2_grpc  # noqa: E402
from google.protobuf import descriptor as _d  # noqa: E402
from google.protobuf.duration_pb2 import Duration  # noqa: E402
from google.protobuf.message_factory import GetMessageClass  # noqa: E402
from grpc_status import rpc_status  # noqa: E402

from surgeon.v1 import surgeon_pb2 as pb  # noqa: E402
from tests.grpc_helpers import RPC_TIMEOUT  # noqa: E402

Code = grpc.StatusCode
DOCUMENTED_STATUS = {
    Code.OK,
    Code.INVALID_ARGUMENT,
    Code.NOT_FOUND,
    Code.FAILED_PRECONDITION,
    Code.PERMISSION_DENIED,
    Code.RESOURCE_EXHAUSTED,
    Code.UNAVAILABLE,
    Code.CANCELLED,
}
#: the Surgeon service and google.longrunning.Operations, which serves Get/List/Wait/Cancel/DeleteOperation
SERVICES = [pb.DESCRIPTOR.services_by_name["Surgeon"], operations_pb2.DESCRIPTOR.services_by_name["Operations"]]
METHODS = [(service, rpc) for service in SERVICES for rpc in service.methods]
WORDS = ["", "toy", "images", "val", "pool.txt", "../x", "/etc", "local-dir:tiny", "L1.H0,L2.H1", "1-2", "all"]
WORDS += ["top-k", "random", "heads", "debias", "hard", "onnx", "both", "operations/x", "ranking", "labels.txt"]
texts = st.one_of(
    st.sampled_from(WORDS),
    st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30),
    st.integers(min_value=0, max_value=100_000).map(lambda n: "L1.H" + "9" * n),
)
INTS = {
    _d.FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    _d.FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    _d.FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    _d.FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
}


def _scalar(field: _d.FieldDescriptor):
    if field.type == _d.FieldDescriptor.TYPE_STRING:
        return texts
    if field.type in INTS:
        low, high = INTS[field.type]
        return st.one_of(st.integers(-3, 300), st.integers(low, high))
    if field.type in (_d.FieldDescriptor.TYPE_DOUBLE, _d.FieldDescriptor.TYPE_FLOAT):
        return st.floats(allow_nan=True, allow_infinity=True, width=64 if field.type == field.TYPE_DOUBLE else 32)
    if field.type == _d.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if field.type == _d.FieldDescriptor.TYPE_ENUM:
        return st.sampled_from([v.number for v in field.enum_type.values])
    return None


def messages(descriptor: _d.Descriptor, depth: int = 0):
    """Random messages of `descriptor`: every field optional, nested messages down to depth 3."""
    if descriptor.full_name == "google.protobuf.Duration":
        return st.builds(Duration, seconds=st.integers(-(2**40), 2**40), nanos=st.integers(-999_999_999, 999_999_999))
    fields = {}
    for field in descriptor.fields:
        if field.type == _d.FieldDescriptor.TYPE_MESSAGE:
            if depth >= 3 or field.message_type.full_name.startswith("google.protobuf.Struct"):
                continue
            strategy = messages(field.message_type, depth + 1)
        else:
            strategy = _scalar(field)
        if strategy is None:
            continue
        fields[field.name] = st.lists(strategy, max_size=3) if field.is_repeated else strategy
    cls = GetMessageClass(descriptor)
    return st.fixed_dictionaries({}, optional=fields).map(lambda kwargs: cls(**kwargs))


@pytest.mark.slow  # hypothesis examples for every RPC over a real server
@pytest.mark.parametrize("service, rpc", METHODS, ids=[rpc.name for _, rpc in METHODS])
def test_grpc_requests(service, rpc, channel, tmp_path):  # noqa: F811
    call = (channel.unary_stream if rpc.server_streaming else channel.unary_unary)(
        f"/{service.full_name}/{rpc.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=GetMessageClass(rpc.output_type).FromString,
    )
    cancel = operations_pb2_grpc.OperationsStub(channel).CancelOperation
    start = _rss_mb()

    @FUZZ
    @given(messages(rpc.input_type))
    def check(request):
        try:
            result = call(request, timeout=RPC_TIMEOUT)
            if rpc.server_streaming:
                for _ in zip(range(2), result, strict=False):
                    pass
                result.cancel()
            code = Code.OK
        except grpc.RpcError as error:
            code = error.code()
            assert len(error.details() or "") < 2000
            status = rpc_status.from_call(error)  # google.rpc.Status in the trailer: the same code, short
            assert status is None or (status.code == code.value[0] and status.ByteSize() < 4000), status
            result = None
        assert code in DOCUMENTED_STATUS, (rpc.name, str(request)[:300], code)
        if isinstance(result, operations_pb2.Operation) and result.name and not result.done:
            try:  # an accepted job: stop it at its next step (the fuzz checks validation, not the jobs)
                cancel(operations_pb2.CancelOperationRequest(name=result.name), timeout=RPC_TIMEOUT)
            except grpc.RpcError as error:
                assert error.code() == Code.FAILED_PRECONDITION

    check()
    assert _rss_mb() - start < RSS_GROWTH_LIMIT_MB
