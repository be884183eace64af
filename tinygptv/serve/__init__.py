"""Serving TinyGPT-V: an OpenAI-compatible HTTP API and a Gradio web demo.

* :mod:`tinygptv.serve.api` -- ``create_app(model_or_loader, settings)``: the FastAPI app
  (``/v1/chat/completions``, ``/v1/models``, ``/health``).
* :mod:`tinygptv.serve.messages` -- OpenAI chat messages -> our template's images, history,
  question and task; every limit on what a request may hold.
* :mod:`tinygptv.serve.engine` -- one batch or one stream through the model.
* :mod:`tinygptv.serve.batcher` -- the bounded queue and the worker thread that batches
  compatible requests.
* :mod:`tinygptv.serve.demo` -- ``create_demo(model_or_loader)``: the Gradio page.

Importing any of these loads no model, reads no file and opens no socket; FastAPI, uvicorn and
gradio are the optional ``serve`` extra (``pip install tinygptv[serve]``).
"""
