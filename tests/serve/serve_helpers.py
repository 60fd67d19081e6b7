"""Shared by the serve tests: a tiny random chat model saved to a folder, and a uvicorn server
on a free loopback port in a background thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import torch

from lmforge.model import ModelConfig, build
from lmforge.store import save_model
from lmforge.tokenizer import ByteTokenizer

TIMEOUT = 60  # seconds any single wait may take on a loaded 2-core machine


def save_tiny_model(folder, context_length: int = 512):
    """A 2-layer Llama-style decoder over a byte tokenizer (lmforge's chat template), saved with
    its tokenizer. Random weights, seeded: its greedy answers are fixed."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    model = build(ModelConfig(vocab_size=tok.vocab_size, context_length=context_length, n_layer=2, n_head=4,
                              n_kv_head=2, n_embd=32, activation="swiglu", norm="rmsnorm", positional="rope",
                              bias=False, tie_embeddings=False, init_std=0.1)).eval()
    save_model(model, folder, tokenizer=tok)
    return folder


@contextlib.contextmanager
def running_server(app):
    """``base_url`` of ``app`` served by uvicorn on 127.0.0.1 (a free port) until the block ends."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=10))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    end = time.monotonic() + TIMEOUT
    while not server.started:
        if time.monotonic() > end or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
