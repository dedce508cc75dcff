"""``deltatune serve``: load the model and its adapters, then run the app under uvicorn."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import uvicorn

from .app import create_app
from .model import load_served
from .service import Limits, Service


@dataclass(frozen=True)
class Settings:
    model: str
    adapters: Sequence[tuple[str, str]] = ()
    served_model_name: str = ""
    host: str = "127.0.0.1"
    port: int = 8000
    limits: Limits = field(default_factory=Limits)
    device: str = ""
    threads: int = 0
    log_level: str = "info"


def build_service(settings: Settings) -> Service:
    """The loaded model, with the ``--adapter`` folders on it, ready to serve (the worker not yet started)."""
    served = load_served(settings.model, settings.served_model_name, settings.device)
    if settings.threads:  # after loading: a run folder's rebuild sets its own thread count
        torch.set_num_threads(settings.threads)
    service = Service(served, settings.limits)
    service.load_startup_adapters(settings.adapters)
    return service


def serve(settings: Settings) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM: uvicorn finishes, the worker fails what is left with 503)."""
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    service = build_service(settings)
    names = service.table.names()
    print(f"deltatune serve: {service.served.kind} with {names[0]!r} and adapters {names[1:]} on "
          f"http://{settings.host}:{settings.port}/v1", flush=True)
    uvicorn.run(create_app(service), host=settings.host, port=settings.port, log_level=settings.log_level)
