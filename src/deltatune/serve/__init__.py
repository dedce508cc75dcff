"""``deltatune serve``: one base model, many adapters, over HTTP (OpenAI-compatible; needs ``deltatune[serve]``).

Requests choose their adapter with the ``model`` field, as in vLLM; adapters load and unload at run
time; concurrent requests for any adapters are batched together, with rows joining and leaving the
batch between decode steps (continuous batching) and each row computed with its own adapter
(``deltatune.routing``). See docs/serving.md.
"""

from .app import create_app
from .model import ServedModel, load_served
from .server import Settings, build_service, serve
from .service import Limits, Service

__all__ = ["Limits", "ServedModel", "Service", "Settings", "build_service", "create_app", "load_served", "serve"]
