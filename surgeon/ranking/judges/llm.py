"""The `llm` judge: the paper's own procedure (docs/METHOD.md §1.3-1.4), asked of any OpenAI-compatible
chat-completions endpoint (OpenAI, vLLM, llama.cpp, Ollama...).

Requests: per head and per model, one labelling request over the head's texts, then one judging request
per text. One request per text keeps the paper's per-text prompt verbatim, makes the answer a lone digit
that cannot be misaligned with its text, and caches each verdict on its own, so a rerun with one text
changed re-asks only that text.

Several models: every model labels the head and the label is the most common one (ties go to the model
listed first); every model then judges each text against that shared label, and a text is consistent
when more than half of the models say 1 (an even split counts as 0).

Every parsed answer is cached on disk, keyed by model + messages (not the URL), so a rerun makes no
requests. Failures are raised at once with no retry: a down endpoint must fail fast.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import string
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from surgeon.core.errors import CorruptInput, InvalidInput, NotFound, PermissionDenied, PreconditionFailed
from surgeon.core.paths import atomic_file
from surgeon.ranking.judges.base import JUDGES, HeadJudgement, Judge, JudgeContext

LABEL_PROMPT = (
    "What is the common characteristic in the following quoted lines? Provide a one-word response without punctuation."
)
JUDGE_PROMPT = "Rate the association of the property label to the text. 1 if associated and 0 if not associated."

# In-context examples: (texts, label) for labelling, (label, text, digit) for judging.
LABEL_EXAMPLES: tuple[tuple[tuple[str, ...], str], ...] = (
    (("Photo taken in Paris", "A street in Tokyo", "Image of a village in Norway"), "locations"),
    (("Vibrant red tones", "A pale blue background", "Shades of green"), "colors"),
    (("A sleeping cat", "A dog on the beach", "A flock of birds"), "animals"),
)
JUDGE_EXAMPLES: tuple[tuple[str, str, str], ...] = (
    ("colors", "Shades of green", "1"),
    ("colors", "A dog on the beach", "0"),
)

Messages = list[dict[str, str]]
T = TypeVar("T")


def label_messages(texts: Sequence[str]) -> Messages:
    """The labelling conversation: the paper's question, few-shot examples, then the head's texts."""
    messages: Messages = []
    for example_texts, example_label in LABEL_EXAMPLES:
        messages.append({"role": "user", "content": _label_question(example_texts)})
        messages.append({"role": "assistant", "content": example_label})
    messages.append({"role": "user", "content": _label_question(texts)})
    return messages


def judge_messages(label: str, text: str) -> Messages:
    """The judging conversation for one text: the paper's rating prompt with two examples."""
    messages: Messages = []
    for example_label, example_text, digit in JUDGE_EXAMPLES:
        messages.append({"role": "user", "content": _judge_question(example_label, example_text)})
        messages.append({"role": "assistant", "content": digit})
    messages.append({"role": "user", "content": _judge_question(label, text)})
    return messages


def _label_question(texts: Sequence[str]) -> str:
    return LABEL_PROMPT + "\n" + "\n".join(f'"{t}"' for t in texts)


def _judge_question(label: str, text: str) -> str:
    return f'{JUDGE_PROMPT} Answer with the digit only.\nProperty label: {label}\nText: "{text}"'


def parse_label(answer: str) -> str | None:
    """First word, lowercased, punctuation stripped; None when nothing word-like is left."""
    words = answer.split()
    if not words:
        return None
    word = words[0].strip(string.punctuation + "“”‘’«»").lower()
    return word if any(c.isalnum() for c in word) else None


def parse_verdict(answer: str) -> bool | None:
    """The answer must contain exactly one number and it must be 0 or 1 ("1", "**1**", "Rating: 0.")."""
    numbers = re.findall(r"\d+", answer)
    if len(numbers) != 1 or numbers[0] not in ("0", "1"):
        return None
    return numbers[0] == "1"


def _most_common(items: Sequence[T]) -> T:
    """Most frequent item; ties go to the one seen first (Counter keeps insertion order)."""
    return Counter(items).most_common(1)[0][0]


class LLMJudge:
    """Labels and judges heads through chat completions, caching every parsed answer on disk."""

    name = "llm"

    def __init__(
        self,
        url: str,
        models: Sequence[str],
        api_key: str | None,
        timeout_s: float,
        cache_dir: Path,
    ):
        self.endpoint = _endpoint(url)
        self.models = tuple(models)
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.cache_dir = cache_dir

    def judge(self, heads: Sequence[Sequence[str]]) -> list[HeadJudgement]:
        return [self._judge_head(list(texts)) for texts in heads]

    def _judge_head(self, texts: list[str]) -> HeadJudgement:
        if not texts:
            return HeadJudgement(label="", verdicts=())
        label = _most_common([self._ask(m, label_messages(texts), parse_label) for m in self.models])
        verdicts = tuple(
            2 * sum(self._ask(m, judge_messages(label, t), parse_verdict) for m in self.models) > len(self.models)
            for t in texts
        )
        return HeadJudgement(label=label, verdicts=verdicts)

    def _ask(self, model: str, messages: Messages, parse: Callable[[str], T | None]) -> T:
        """Cached answer if any, else one request; only an answer that parses is cached."""
        path = self.cache_dir / f"{_cache_key(model, messages)}.json"
        cached = _read_cache(path)
        if cached is not None:
            value = parse(cached)
            if value is not None:
                return value
        answer = self._post(model, messages)
        value = parse(answer)
        if value is None:
            raise CorruptInput(
                f"LLM {self.endpoint} (model {model}) gave an unparseable answer: {_excerpt(answer)!r}",
                hint="the judge expects a one-word label or a lone 0/1; try an instruction-tuned model",
            )
        self._write_cache(path, model, answer)
        return value

    def _post(self, model: str, messages: Messages) -> str:
        body = json.dumps({"model": model, "messages": messages, "temperature": 0}).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.endpoint, data=body, headers=headers, method="POST")
        where = f"LLM {self.endpoint} (model {model})"
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as err:
            raise _http_error(where, err) from None
        except urllib.error.URLError as err:
            if isinstance(err.reason, TimeoutError):
                raise _timeout(where, self.timeout_s) from None
            raise PreconditionFailed(
                f"{where} is unreachable: {err.reason}", hint="is the server running at that URL?"
            ) from None
        except TimeoutError:
            raise _timeout(where, self.timeout_s) from None
        except (OSError, http.client.HTTPException) as err:
            raise PreconditionFailed(
                f"{where} failed: {type(err).__name__}: {err}", hint="is it an OpenAI-compatible endpoint?"
            ) from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (ValueError, KeyError, IndexError, TypeError):
            content = None
        if not isinstance(content, str):
            raise CorruptInput(
                f"{where} did not return a chat completion: {_excerpt(raw.decode('utf-8', 'replace'))!r}",
                hint="the URL must be the API base of an OpenAI-compatible server, e.g. http://host:8000/v1",
            )
        return content

    def _write_cache(self, path: Path, model: str, answer: str) -> None:
        """Atomic, so an interrupted run never leaves a half-written entry."""
        try:
            with atomic_file(path, suffix=".json") as tmp:
                tmp.write_text(json.dumps({"model": model, "answer": answer}), encoding="utf-8")
        except OSError as err:
            raise PermissionDenied(
                f"cannot write the LLM cache in {self.cache_dir}: {err}",
                hint="choose a writable cache folder",
            ) from None


def _endpoint(url: str) -> str:
    """`{url}/chat/completions`, also accepting a URL that already ends there."""
    url = url.rstrip("/")
    return url if url.endswith("/chat/completions") else f"{url}/chat/completions"


def _cache_key(model: str, messages: Messages) -> str:
    blob = json.dumps({"model": model, "messages": messages}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _read_cache(path: Path) -> str | None:
    """The cached answer, or None when absent or unreadable (then it is simply asked again)."""
    try:
        answer = json.loads(path.read_text(encoding="utf-8"))["answer"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return answer if isinstance(answer, str) else None


def _excerpt(text: str, limit: int = 160) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[:limit] + "..."


def _timeout(where: str, timeout_s: float) -> PreconditionFailed:
    return PreconditionFailed(
        f"{where} timed out after {timeout_s:g}s", hint="raise the LLM timeout or use a faster server"
    )


def _http_error(where: str, err: urllib.error.HTTPError) -> PreconditionFailed | PermissionDenied | NotFound:
    try:
        body = err.read(500).decode("utf-8", "replace")
    except OSError:
        body = ""
    message = f"{where} answered HTTP {err.code}: {_excerpt(body) or err.reason}"
    if err.code in (401, 403):
        return PermissionDenied(message, hint="check the API key in the environment variable the judge reads")
    if err.code == 404:
        return NotFound(message, hint="check the model name and that the URL is the API base, e.g. .../v1")
    return PreconditionFailed(message, hint="check the server's log")


@JUDGES.register("llm")
def make_llm_judge(ctx: JudgeContext) -> Judge:
    """Build the llm judge from the context; the API key is read from the environment, never stored."""
    if not ctx.llm_url:
        raise InvalidInput(
            "the llm judge needs an endpoint URL",
            hint="give the base URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1",
        )
    if urllib.parse.urlsplit(ctx.llm_url).scheme not in ("http", "https"):
        raise InvalidInput(f"LLM URL must be http(s): {ctx.llm_url!r}", hint="e.g. http://127.0.0.1:8000/v1")
    models = tuple(m.strip() for m in ctx.llm_models if m.strip())
    if not models:
        raise InvalidInput("the llm judge needs at least one model name", hint="e.g. gpt-4o or the served model")
    if ctx.llm_timeout_s <= 0:
        raise InvalidInput(f"LLM timeout must be positive, got {ctx.llm_timeout_s}")
    api_key = os.environ.get(ctx.llm_key_env) if ctx.llm_key_env else None
    cache_root = ctx.cache_dir if ctx.cache_dir is not None else Path.home() / ".cache" / "surgeon"
    return LLMJudge(ctx.llm_url, models, api_key, ctx.llm_timeout_s, cache_root / "llm")
