"""Liveness, readiness and the model repository, told truthfully.

Why: KServe's data plane answers live and ready whatever the model's state, and its
repository extension lets anyone who reaches the port unload the model, after which nothing
in the process can load it again. Here:

- the repository endpoints (REST `/v2/repository/models/{name}/load|unload`, gRPC
  `RepositoryModelLoad/Unload`) raise `RepositoryDisabled` (403 / PERMISSION_DENIED) unless
  `--enable_model_repository` is on;
- readiness (`/v2/health/ready`, gRPC `ServerReady`) is false while a model is not loaded or
  not healthy; the model's own readiness route answers 404 once it is unloaded;
- liveness (`/v2/health/live`, gRPC `ServerLive`) is the models' `alive` property: false once
  a model cannot come back (it was unloaded: `load` cannot build it again in this process),
  so Kubernetes restarts the pod instead of keeping one that answers nothing;
- the request path never loads a model: KServe's `DataPlane.get_model` calls `model.load()`
  whenever a model is not ready, which during the drain (readiness false) loaded a second
  copy of the weights for the next gRPC call, and after the engine process died built a new
  one behind a liveness that said dead. Here a model that cannot serve is a 503 with
  Retry-After (gRPC UNAVAILABLE) saying why; models load at start-up only. After the engine
  process dies the policy is fail fast: not ready, not live, every request refused until
  Kubernetes restarts the pod (docs/shutdown.md).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from kserve.errors import ModelNotFound, ModelNotReady
from kserve.model import BaseKServeModel
from kserve.model_repository import ModelRepository
from kserve.protocol.dataplane import DataPlane
from kserve.protocol.model_repository_extension import ModelRepositoryExtension

from predictor.errors import ModelUnavailable, RepositoryDisabled, Unavailable

logger = logging.getLogger(__name__)
REPOSITORY_EXTENSION = "model_repository_extension"


class ServedModel(Protocol):
    """What health needs from a model (`QwenVLModel` has it)."""

    name: str
    ready: bool

    @property
    def alive(self) -> bool: ...

    async def healthy(self) -> bool: ...

    def serving_refusal(self) -> Unavailable | None: ...


class HealthDataPlane(DataPlane):
    """KServe's data plane whose live and ready answers come from the served models."""

    def __init__(
        self,
        model_registry: ModelRepository,
        models: Sequence[ServedModel],
        repository_enabled: bool,
    ):
        super().__init__(model_registry=model_registry)
        self.models = tuple(models)
        self.repository_enabled = repository_enabled

    @property
    def alive(self) -> bool:
        return all(model.alive for model in self.models)

    async def live(self) -> dict[str, str]:  # KServe's is a staticmethod saying "alive"
        return {"status": "alive" if self.alive else "dead"}

    async def ready(self) -> bool:
        if not self.alive:
            return False
        for model in self.models:
            if self.model_registry.get_model(model.name) is not model:
                return False  # unloaded
            if not await model.healthy():
                return False
        return await super().ready()

    async def get_model(self, name: str) -> BaseKServeModel:
        """The model to serve a request: 404 if unknown, 503 + Retry-After if it cannot serve
        now; never `model.load()` (KServe's loads a model that is not ready)."""
        model = self.get_model_from_registry(name)
        refusal = getattr(model, "serving_refusal", None)
        if refusal is not None:
            error = refusal()
            if error is not None:
                raise error
        elif not await self._model_registry.is_model_ready(name):
            raise ModelUnavailable(name, "is not ready")
        return model

    def metadata(self) -> dict[str, Any]:
        metadata = super().metadata()
        if not self.repository_enabled:
            metadata["extensions"] = [
                e for e in metadata["extensions"] if e != REPOSITORY_EXTENSION
            ]
        return metadata


class GuardedRepository(ModelRepositoryExtension):
    """KServe's repository extension, refused unless enabled.

    With it enabled, `unload` stops the model (KServe's own unload), and `load` of a model
    that is loaded is a no-op, as in Triton; an unloaded model cannot be built again in this
    process, so `load` says so (503) and liveness is already false. Both return the dict
    KServe's gRPC servicer reads (its own extension returns None there, a gRPC 500).
    """

    def __init__(
        self, model_registry: ModelRepository, models: Sequence[ServedModel], enabled: bool
    ):
        super().__init__(model_registry=model_registry)
        self._registry = model_registry
        self._names = {model.name for model in models}
        self.enabled = enabled

    def _allow(self) -> None:
        if not self.enabled:
            raise RepositoryDisabled()

    async def load(self, model_name: str) -> dict[str, Any]:
        self._allow()
        if model_name not in self._names:
            raise ModelNotFound(model_name)
        if not await self._registry.is_model_ready(model_name):
            raise ModelNotReady(
                model_name,
                "An unloaded model cannot be loaded again in this process; the server's "
                "liveness is false until it is restarted",
            )
        return {"name": model_name, "load": True}

    async def unload(self, model_name: str) -> dict[str, Any]:
        self._allow()
        await super().unload(model_name)
        logger.warning(
            "model %s unloaded through the model repository API: not ready, not live", model_name
        )
        return {"name": model_name, "unload": True}
