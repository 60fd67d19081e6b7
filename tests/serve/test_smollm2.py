"""lmforge serve on the real SmolLM2-135M-Instruct GGUF: two chat questions asked at once through
the openai client get the greedy answers lmforge.generate gives each alone (the model's own
chat template and end-of-turn token)."""

from __future__ import annotations

import concurrent.futures

import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")

from tests.smollm2_file import require_smollm2  # noqa: E402
from tests.serve.serve_helpers import TIMEOUT, running_server  # noqa: E402

from lmforge.chat import render  # noqa: E402
from lmforge.generate import generate_text  # noqa: E402
from lmforge.serve.app import create_app  # noqa: E402
from lmforge.serve.batcher import Batcher  # noqa: E402
from lmforge.serve.loading import load_model_for_serving  # noqa: E402


@pytest.mark.slow
def test_smollm2_concurrent_chat_equals_generate_alone():
    model, tok, name = load_model_for_serving(require_smollm2())
    questions = ["What is the capital of France?", "Give me three tips for sleeping well."]
    n = 12
    batcher = Batcher(model, tok, max_batch=2)
    with running_server(create_app(batcher, name)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT * 5)

        def ask(q):
            r = client.chat.completions.create(model=name, messages=[{"role": "user", "content": q}], temperature=0,
                                               max_tokens=n)
            return r.choices[0].message.content

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(ask, questions))
        assert batcher.stats()["max_batch_seen"] == 2
    for q, a in zip(questions, answers):
        prompt = render([{"role": "user", "content": q}], tok, add_generation_prompt=True)
        assert a == generate_text(model, tok, prompt, max_new_tokens=n, temperature=0)
    assert answers[0].startswith("The capital of France is Paris")
