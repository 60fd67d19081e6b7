"""``lmforge judge``: score answers 0-100 with a judge model behind any OpenAI-compatible endpoint.

    lmforge judge --answers runs/sft/test_responses.jsonl --endpoint http://127.0.0.1:8000

Each line of the answers file is a JSON object with ``prompt`` and ``response`` (and optionally
``reference``): the fields the SFT recipes write to ``test_responses.jsonl``. The judge model
gets our grading instructions (:data:`SYSTEM`), the question, the reference when there is one and
the candidate answer, and replies with its reasons and a last line ``Score: N``. The report: the
mean score, how the scores spread over five bands, and the lowest-scored answers; ``--out``
writes every judgement as JSON lines. A reply without a score, or a request the endpoint refuses
(e.g. a prompt too long for the judge), counts as unscored and is listed, not averaged.
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from lmforge.errors import InputError

SYSTEM = (
    "You grade answers. You are shown a question, sometimes a reference answer, and a candidate "
    "answer. Judge how well the candidate answers the question: correctness first, then whether it "
    "is complete, then whether it is clear. A reference, when given, shows what a good answer "
    "contains; the candidate need not repeat its wording. Give your reasons in one or two "
    "sentences, then end with a line of the form 'Score: N', where N is a whole number from 0 "
    "(wrong, empty or off-topic) to 100 (correct, complete and clear)."
)
BANDS = ((0, 19), (20, 39), (40, 59), (60, 79), (80, 100))
_SCORE = re.compile(r"score\s*[:=]?\s*\**\s*(\d{1,3})(?:\s*/\s*100)?", re.IGNORECASE)


@dataclass
class Judgement:
    index: int  # line of the answers file, from 0
    prompt: str
    response: str
    score: int | None  # None: unscored (see reply)
    reply: str  # the judge's words, or why there is no score


def read_answers(path) -> list[dict]:
    """The records of a JSONL answers file, each with string ``prompt`` and ``response``."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"--answers {p}: not valid UTF-8 (byte {e.start}); expected JSON lines") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"--answers {p}, line {n}: malformed JSON ({e.msg}); expected one JSON object a line") \
                from None
        if not isinstance(r, dict) or not isinstance(r.get("prompt"), str) or not isinstance(r.get("response"), str):
            raise InputError(f"--answers {p}, line {n}: expected an object with string 'prompt' and 'response' "
                             f"(and optionally 'reference'), as test_responses.jsonl has")
        if r.get("reference") is not None and not isinstance(r["reference"], str):
            raise InputError(f"--answers {p}, line {n}: 'reference' is a {type(r['reference']).__name__}; "
                             f"expected a string or null")
        records.append(r)
    if not records:
        raise InputError(f"--answers {p}: no answers; expected JSON lines with 'prompt' and 'response'")
    return records


def judge_messages(record: dict) -> list[dict]:
    """The chat the judge model answers for one record."""
    parts = [f"Question:\n{record['prompt'].strip()}"]
    if record.get("reference"):
        parts.append(f"Reference answer:\n{record['reference'].strip()}")
    parts.append(f"Candidate answer:\n{record['response'].strip() or '(empty)'}")
    parts.append("Grade the candidate answer. End with 'Score: N' (0-100).")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_score(reply: str) -> int | None:
    """The last ``Score: N`` in the judge's reply, N in 0..100; None when there is none."""
    found = [int(m.group(1)) for m in _SCORE.finditer(reply)]
    return found[-1] if found and 0 <= found[-1] <= 100 else None


def summarize(judgements: list[Judgement], lowest: int = 5) -> dict:
    """Mean, count per score band, and the ``lowest`` lowest-scored answers (ties: file order)."""
    scored = [j for j in judgements if j.score is not None]
    bands = {f"{a}-{b}": sum(a <= j.score <= b for j in scored) for a, b in BANDS}
    worst = sorted(scored, key=lambda j: (j.score, j.index))[:lowest]
    return {"answers": len(judgements), "scored": len(scored), "unscored": len(judgements) - len(scored),
            "mean": sum(j.score for j in scored) / len(scored) if scored else None,
            "distribution": bands, "lowest": [asdict(j) for j in worst],
            "unscored_answers": [asdict(j) for j in judgements if j.score is None]}


class Endpoint:
    """An OpenAI-compatible server: ``URL`` or ``URL/v1``."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 3):
        import httpx

        url = url.rstrip("/")
        if not re.match(r"https?://", url):
            raise InputError(f"--endpoint {url}: expected an http:// or https:// URL")
        self.base = url if url.endswith("/v1") else url + "/v1"
        self.retries = retries
        self.http = httpx.Client(timeout=timeout)

    def _request(self, method: str, path: str, **kw):
        import httpx

        for attempt in range(self.retries + 1):
            try:
                r = self.http.request(method, self.base + path, **kw)
            except httpx.TransportError as e:
                raise InputError(f"--endpoint {self.base}: cannot reach it ({type(e).__name__}: {e})") from None
            if r.status_code not in (429, 503) or attempt == self.retries:
                return r
            time.sleep(0.5 * 2 ** attempt)  # busy: wait and try again (bounded)
        return r

    def first_model(self) -> str:
        r = self._request("GET", "/models")
        try:
            return r.json()["data"][0]["id"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise InputError(f"--endpoint {self.base}: GET /models answered {r.status_code} without a model; "
                             f"give --model NAME") from None

    def chat(self, model: str, messages: list[dict], max_tokens: int) -> tuple[str | None, str | None]:
        """``(reply, None)``, or ``(None, why)`` when the endpoint refuses this one request (4xx)."""
        r = self._request("POST", "/chat/completions", json={"model": model, "messages": messages,
                                                              "temperature": 0, "max_tokens": max_tokens})
        if r.status_code == 200:
            return r.json()["choices"][0]["message"]["content"] or "", None
        why = _error_message(r)
        if r.status_code in (401, 403, 404) or r.status_code >= 500:  # wrong for every answer: stop here
            raise InputError(f"--endpoint {self.base}: {r.status_code}: {why}")
        return None, f"the endpoint refused it ({r.status_code}: {why})"

    def close(self) -> None:
        self.http.close()


def _error_message(r) -> str:
    try:
        return r.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return r.text[:200]


def judge_answers(records: list[dict], endpoint: Endpoint, model: str, max_tokens: int = 256,
                  concurrency: int = 4) -> list[Judgement]:
    """Every record judged (``concurrency`` requests at a time), in file order."""

    def one(i: int) -> Judgement:
        r = records[i]
        reply, why = endpoint.chat(model, judge_messages(r), max_tokens)
        if reply is None:
            return Judgement(i, r["prompt"], r["response"], None, why)
        return Judgement(i, r["prompt"], r["response"], parse_score(reply), reply)

    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        return list(pool.map(one, range(len(records))))


def format_report(s: dict, model: str, url: str, width: int = 80) -> str:
    def short(text: str) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."

    mean = f"{s['mean']:.1f}" if s["mean"] is not None else "n/a"
    lines = [f"judged {s['answers']} answers with {model} at {url}: mean score {mean} "
             f"({s['scored']} scored, {s['unscored']} unscored)",
             "distribution: " + "  ".join(f"{band}: {n}" for band, n in s["distribution"].items())]
    if s["lowest"]:
        lines.append("lowest scored:")
        for j in s["lowest"]:
            lines += [f"  #{j['index']} score {j['score']}", f"    prompt:   {short(j['prompt'])}",
                      f"    response: {short(j['response'])}", f"    judge:    {short(j['reply'])}"]
    if s["unscored_answers"]:
        lines.append("unscored:")
        lines += [f"  #{j['index']}: {short(j['reply'])}" for j in s["unscored_answers"]]
    return "\n".join(lines)
