"""The llm judge against a real local HTTP server that fakes an OpenAI chat-completions endpoint."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import surgeon.ranking.judges  # noqa: F401  (registers the judges)
from surgeon.core.errors import CorruptInput, InvalidInput, PreconditionFailed, SurgeonError
from surgeon.ranking.judges.base import JUDGES, JudgeContext
from surgeon.ranking.judges.llm import make_llm_judge, parse_label, parse_verdict

KEYWORDS = {
    "locations": {"paris", "tokyo", "cairo", "city", "village"},
    "colors": {"red", "blue", "green", "yellow", "orange"},
    "animals": {"cat", "dog", "bird", "horse"},
}
CLEAR = ["A photo of Paris", "Tokyo at night", "A city skyline", "Streets of Cairo", "A quiet village"]
MIXED = ["Bright red paint", "A blue door", "A dog running", "Green leaves", "A sleeping cat"]


def _concepts(text: str) -> set[str]:
    words = set(re.findall(r"[a-z]+", text.lower()))
    return {concept for concept, keys in KEYWORDS.items() if words & keys}


def fake_answer(model: str, prompt: str) -> str:
    """Labels by keyword majority and judges by keyword; some model names misbehave on purpose."""
    if prompt.startswith("What is the common characteristic"):
        lines = re.findall(r'"([^"]*)"', prompt)
        counts = {c: sum(c in _concepts(line) for line in lines) for c in KEYWORDS}
        label = max(counts, key=counts.get)
        if model == "contrarian":
            return "hues"
        return f"**{label.capitalize()}**." if model == "chatty" else label
    label = re.search(r"Property label: (\S+)", prompt).group(1)
    text = re.search(r'Text: "(.*)"', prompt).group(1)
    verdict = label in _concepts(text)
    if model == "contrarian":
        verdict = not verdict
    if model == "vague":
        return "I think maybe"
    return f"Rating: {int(verdict)}." if model == "chatty" else str(int(verdict))


class FakeHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.requests.append({"auth": self.headers.get("Authorization"), "body": body})
        model = body["model"]
        if model == "slow":
            time.sleep(1.0)
        if model == "boom":
            payload, status = b"upstream exploded: out of memory", 500
        else:
            content = fake_answer(model, body["messages"][-1]["content"])
            payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": content}}]}).encode()
            status = 200
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


class FakeServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the slow handler writes to a socket the client already closed


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server() -> Iterator[FakeServer]:
    srv = FakeServer(("127.0.0.1", 0), FakeHandler)
    srv.requests = []
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}/v1"
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def _ctx(url: str | None, models: tuple[str, ...], cache: Path, **kw: object) -> JudgeContext:
    return JudgeContext(taxonomy={}, llm_url=url, llm_models=models, cache_dir=cache, **kw)


def _cache_files(cache: Path) -> list[Path]:
    folder = cache / "llm"
    return sorted(folder.iterdir()) if folder.exists() else []


def test_registered() -> None:
    assert JUDGES.get("llm") is make_llm_judge


def test_clear_and_mixed_heads(server: FakeServer, tmp_path: Path) -> None:
    judge = make_llm_judge(_ctx(server.url, ("a",), tmp_path))
    clear, mixed = judge.judge([CLEAR, MIXED])
    assert (clear.label, clear.ccs, clear.verdicts) == ("locations", 5, (True,) * 5)
    assert (mixed.label, mixed.ccs, mixed.verdicts) == ("colors", 3, (True, True, False, True, False))
    assert len(server.requests) == 2 * (1 + 5)
    body = server.requests[0]["body"]
    assert body["temperature"] == 0 and body["model"] == "a"
    assert body["messages"][-1]["content"].startswith(
        "What is the common characteristic in the following quoted lines? "
        "Provide a one-word response without punctuation."
    )
    judging = server.requests[1]["body"]["messages"][-1]["content"]
    assert judging.startswith("Rate the association of the property label to the text. 1 if associated")


def test_chatty_answers_are_parsed(server: FakeServer, tmp_path: Path) -> None:
    [mixed] = make_llm_judge(_ctx(server.url, ("chatty",), tmp_path)).judge([MIXED])
    assert (mixed.label, mixed.ccs) == ("colors", 3)


def test_majority_vote_outvotes_a_contrarian(server: FakeServer, tmp_path: Path) -> None:
    [alone] = make_llm_judge(_ctx(server.url, ("contrarian",), tmp_path)).judge([MIXED])
    assert alone.label == "hues"
    [voted] = make_llm_judge(_ctx(server.url, ("a", "contrarian", "b"), tmp_path)).judge([MIXED])
    assert voted.label == "colors"
    assert voted.verdicts == (True, True, False, True, False)
    assert {r["body"]["model"] for r in server.requests} == {"a", "b", "contrarian"}
    [split] = make_llm_judge(_ctx(server.url, ("contrarian", "a"), tmp_path)).judge([MIXED])
    assert split.label == "hues" and split.ccs == 0  # label tie -> first model; verdict tie -> 0


def test_second_run_hits_cache_even_at_another_url(server: FakeServer, tmp_path: Path) -> None:
    first = make_llm_judge(_ctx(server.url, ("a", "b"), tmp_path)).judge([CLEAR, MIXED])
    asked = len(server.requests)
    assert asked == 2 * 2 * (1 + 5)
    files = _cache_files(tmp_path)
    assert len(files) == asked and all(f.suffix == ".json" and not f.name.startswith(".") for f in files)
    second = make_llm_judge(_ctx(server.url, ("a", "b"), tmp_path)).judge([CLEAR, MIXED])
    assert second == first and len(server.requests) == asked
    elsewhere = make_llm_judge(_ctx(f"http://127.0.0.1:{_closed_port()}/v1", ("a", "b"), tmp_path))
    assert elsewhere.judge([CLEAR, MIXED]) == first


def test_auth_header_only_when_key_set(server: FakeServer, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("SURGEON_TEST_KEY", raising=False)
    make_llm_judge(_ctx(server.url, ("a",), tmp_path / "1", llm_key_env="SURGEON_TEST_KEY")).judge([CLEAR])
    assert {r["auth"] for r in server.requests} == {None}
    monkeypatch.setenv("SURGEON_TEST_KEY", "sk-test-123")
    server.requests.clear()
    make_llm_judge(_ctx(server.url, ("a",), tmp_path / "2", llm_key_env="SURGEON_TEST_KEY")).judge([CLEAR])
    assert {r["auth"] for r in server.requests} == {"Bearer sk-test-123"}


def test_timeout_fails_fast_and_caches_nothing(server: FakeServer, tmp_path: Path) -> None:
    judge = make_llm_judge(_ctx(server.url, ("slow",), tmp_path, llm_timeout_s=0.1))
    start = time.monotonic()
    with pytest.raises(PreconditionFailed, match=r"timed out after 0\.1s") as err:
        judge.judge([CLEAR, MIXED])
    assert time.monotonic() - start < 0.8
    assert server.url in str(err.value) and "model slow" in str(err.value)
    assert len(server.requests) == 1 and _cache_files(tmp_path) == []


def test_http_500_is_a_clear_error(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(SurgeonError) as err:
        make_llm_judge(_ctx(server.url, ("boom",), tmp_path)).judge([CLEAR])
    message = str(err.value).splitlines()[0]
    assert "HTTP 500" in message and "upstream exploded" in message and "model boom" in message
    assert len(server.requests) == 1 and _cache_files(tmp_path) == []


def test_unparseable_answer_is_an_error_and_not_cached(server: FakeServer, tmp_path: Path) -> None:
    with pytest.raises(CorruptInput, match="unparseable answer: 'I think maybe'"):
        make_llm_judge(_ctx(server.url, ("vague",), tmp_path)).judge([CLEAR])
    assert len(server.requests) == 2  # the label (valid, cached), then the first verdict
    [label_entry] = _cache_files(tmp_path)
    assert json.loads(label_entry.read_text())["answer"] == "locations"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_connection_refused_is_one_attempt(tmp_path: Path, monkeypatch) -> None:
    calls = []
    real_urlopen = urllib.request.urlopen

    def counting_urlopen(*args, **kwargs):
        calls.append(args)
        return real_urlopen(*args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting_urlopen)
    url = f"http://127.0.0.1:{_closed_port()}/v1"
    with pytest.raises(PreconditionFailed, match="unreachable") as err:
        make_llm_judge(_ctx(url, ("a",), tmp_path)).judge([CLEAR, MIXED])
    assert f"{url}/chat/completions (model a)" in str(err.value)
    assert len(calls) == 1 and _cache_files(tmp_path) == []


@pytest.mark.parametrize(
    ("url", "models"),
    [(None, ("a",)), ("", ("a",)), ("http://x/v1", ()), ("http://x/v1", (" ",)), ("x", ("a",))],
)
def test_missing_endpoint_or_model_is_invalid(url: str | None, models: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(InvalidInput) as err:
        make_llm_judge(_ctx(url, models, tmp_path))
    assert err.value.hint


def test_parsers() -> None:
    assert parse_label(" Locations.\n") == "locations"
    assert parse_label('"Colors" are common') == "colors"
    assert parse_label("...") is None and parse_label("") is None
    assert [parse_verdict(a) for a in ("1", "**0**", "Rating: 1.", "0\n")] == [True, False, True, False]
    assert [parse_verdict(a) for a in ("I think maybe", "0 or 1", "2", "10")] == [None] * 4
