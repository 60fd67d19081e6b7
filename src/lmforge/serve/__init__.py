"""``lmforge serve``: an OpenAI-compatible HTTP server for any lmforge model.

    lmforge serve --model runs/chat/checkpoints/best --port 8000
    # then any OpenAI client: base_url="http://127.0.0.1:8000/v1"

Modules: :mod:`~lmforge.serve.batcher` (continuous batching, one decode thread owning the
model), :mod:`~lmforge.serve.protocol` (request and response shapes, OpenAI-style errors),
:mod:`~lmforge.serve.app` (the FastAPI routes), :mod:`~lmforge.serve.loading` (the model to
serve), :mod:`~lmforge.serve.command` (the ``serve`` and ``judge`` verbs) and
:mod:`~lmforge.serve.judge` (scoring answers through any OpenAI-compatible endpoint).
FastAPI and uvicorn (``pip install lmforge[serve]``) are imported only by the modules that need them.
"""
