"""The ``lmforge serve`` and ``lmforge judge`` verbs: their arguments and what they run.

``lmforge serve`` loads the model, starts the decode thread and runs uvicorn until Ctrl-C or
SIGTERM; then it stops taking connections, lets the answers in flight finish (up to
``--drain-timeout`` seconds) and exits.

The CLI imports this module to build its parser: what the verbs run (FastAPI, the model, the
batcher) is imported inside the functions, so `lmforge --help` stays light.
"""

from __future__ import annotations

import sys


def add_serve_args(p) -> None:
    p.add_argument("--model", required=True, help="a .gguf file, checkpoint, model folder, run folder (its best "
                                                  "checkpoint) or Hugging Face folder")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", default=None, help="the model's name in the API (default: the file or "
                                                              "folder name)")
    p.add_argument("--quantize", default="none", choices=["none", "fp16", "int8", "int4"],  # model.quantize.METHODS
                   help="linear weights in fewer bytes for faster decoding (as lmforge chat --quantize)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--max-batch", type=int, default=8, help="requests decoded together (continuous batching)")
    p.add_argument("--max-waiting", type=int, default=32, help="requests that may wait for a slot; more get 429")
    p.add_argument("--max-tokens", type=int, default=1024, help="longest answer a request may ask for")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="longest prompt (default: the model's context)")
    p.add_argument("--drain-timeout", type=float, default=60.0,
                   help="on Ctrl-C/SIGTERM, seconds to let answers in flight finish before exiting")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run_serve(args) -> int:
    from lmforge.errors import InputError

    for name in ("max_batch", "max_tokens", "max_prompt_tokens", "port"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise InputError(f"--{name.replace('_', '-')}: got {v}, expected a positive integer")
    if args.max_waiting < 0:
        raise InputError(f"--max-waiting: got {args.max_waiting}, expected an integer >= 0")
    try:
        import uvicorn

        from lmforge.serve.app import ServeLimits, create_app
    except ImportError as e:
        raise InputError(f"lmforge serve needs FastAPI and uvicorn ({e}); pip install 'lmforge[serve]'") from None
    from lmforge.serve.batcher import Batcher
    from lmforge.serve.loading import load_model_for_serving

    model, tok, name = load_model_for_serving(args.model, args.quantize, args.device)
    batcher = Batcher(model, tok, max_batch=args.max_batch, max_waiting=args.max_waiting)
    app = create_app(batcher, args.served_model_name or name,
                     ServeLimits(max_tokens=args.max_tokens, max_prompt_tokens=args.max_prompt_tokens))
    print(f"serving {args.served_model_name or name} (context {model.config.context_length} tokens) at "
          f"http://{args.host}:{args.port}/v1 (chat page: http://{args.host}:{args.port}/)", file=sys.stderr)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.drain_timeout)
    got = _run_until_signal(uvicorn.Server(config))
    batcher.close(drain=False, timeout=5)  # what still runs after the drain timeout is cancelled
    print(f"server stopped{f' ({got})' if got else ''}", file=sys.stderr)
    return 0


def _run_until_signal(server) -> str | None:
    """Run uvicorn; on SIGINT/SIGTERM it stops listening and lets the requests in flight finish.
    uvicorn re-raises the signal it caught once it is done, to the handlers it found: ours only
    note it, so the verb returns normally (exit code 0) after a clean drain. Returns the signal's name."""
    import signal
    import threading

    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():  # signals belong to the main thread
        server.run()
        return None
    sigs = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda sig, frame: caught.append(sig)) for s in sigs}
    try:
        server.run()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return signal.Signals(caught[0]).name if caught else None


def add_judge_args(p) -> None:
    p.add_argument("--answers", required=True, help="JSON lines with prompt, response (and reference): e.g. a "
                                                    "run's test_responses.jsonl")
    p.add_argument("--endpoint", required=True, help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000 "
                                                     "(lmforge serve) or .../v1")
    p.add_argument("--model", default=None, help="the judge model's name at the endpoint (default: the first one "
                                                 "GET /v1/models lists)")
    p.add_argument("--max-tokens", type=int, default=256, help="longest judge reply")
    p.add_argument("--concurrency", type=int, default=4, help="requests in flight at once")
    p.add_argument("--lowest", type=int, default=5, help="how many of the lowest-scored answers to show")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds one judge request may take")
    p.add_argument("--out", default=None, help="write every judgement here (JSON lines)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def run_judge(args) -> int:
    import json

    from lmforge.errors import InputError

    for name in ("max_tokens", "concurrency"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')}: got {getattr(args, name)}, expected a positive integer")
    if args.lowest < 0 or args.timeout <= 0:
        raise InputError(f"--lowest {args.lowest} / --timeout {args.timeout}: expected >= 0 and > 0")
    import importlib.util

    if importlib.util.find_spec("httpx") is None:
        raise InputError("lmforge judge needs httpx; pip install 'lmforge[serve]'")
    from dataclasses import asdict

    from lmforge.serve.judge import Endpoint, format_report, judge_answers, read_answers, summarize

    records = read_answers(args.answers)
    endpoint = Endpoint(args.endpoint, timeout=args.timeout)
    try:
        model = args.model or endpoint.first_model()
        judgements = judge_answers(records, endpoint, model, args.max_tokens, args.concurrency)
    finally:
        endpoint.close()
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            for j in judgements:
                f.write(json.dumps(asdict(j), ensure_ascii=False) + "\n")
    summary = summarize(judgements, args.lowest)
    if args.json:
        print(json.dumps({"model": model, "endpoint": endpoint.base, **summary}, ensure_ascii=False, indent=2))
    else:
        print(format_report(summary, model, endpoint.base))
    return 0
