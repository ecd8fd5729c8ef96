"""What the routes of `sana serve` share: the operator's settings (ServerConfig), the work queue and the
answers kept for Idempotency-Key retries, as one object (ServerState) every handler is handed."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..planning.plan import LoadOptions
from .inputs import InputStore
from .openai_images import Aliases
from .work_queue import Scheduler


class ServerConfig:
    def __init__(self, *, api_key: str | None, output_dir: Path, scratch_dir: Path, load: LoadOptions,
                 models: list[str], host: str = "127.0.0.1", allow_hosts: tuple = (),
                 aliases: Aliases | None = None):
        self.api_key = api_key
        self.host = host
        self.allow_hosts = {name.lower().rstrip(".") for name in allow_hosts}
        self.output_dir = output_dir
        self.scratch_dir = scratch_dir
        self.inputs = InputStore(Path(scratch_dir) / "inputs")  # input files clients sent, by sha256
        self.load = load
        self.models = models
        self.aliases = aliases or Aliases()
        self.draining = False


@dataclass(eq=False)
class ServerState:
    """One server's shared state: set up by create_app, read by every route through the request."""

    scheduler: Scheduler
    config: ServerConfig
    remembered: dict = field(default_factory=dict)  # Idempotency-Key -> (fingerprint, task, expires)
