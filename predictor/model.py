"""The `kserve.Model` that describes images: load, preprocess, predict, postprocess.

Thin by design: parsing lives in `protocol`, image checks in `images`, generation in
`generation`. This class only wires them to KServe's request path and keeps blocking work off
the event loop: images are decoded on KServe's thread pool, and generation runs in the
`Engine`, whose one worker thread owns the model and batches concurrent requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, replace
from typing import Any

import torch
from kserve import Model
from kserve.model import InferenceVerb
from kserve.protocol.infer_type import InferRequest, InferResponse

from predictor import metrics
from predictor.engine.client import FrontLink, RemoteEngine
from predictor.engine.decode_step import configure_compile_cache
from predictor.engine.generation import Generator
from predictor.engine.loading import (
    load_checkpoint_sampling,
    load_model,
    load_processor,
    load_vocab_size,
    vocab_size,
)
from predictor.engine.scheduler import Engine, EngineConfig, Reservation
from predictor.engine.vision_cache import VisionCache
from predictor.errors import (
    EngineUnavailable,
    InvalidRequest,
    ModelUnavailable,
    ShuttingDown,
    StartupError,
    Unavailable,
)
from predictor.inputs.guides import CompiledGuide, GuideCompiler
from predictor.inputs.image_workers import ImageWorkers
from predictor.inputs.images import ImageLimits
from predictor.inputs.input_cache import MIB, InputCache
from predictor.inputs.preprocessing import Preprocessor
from predictor.params import PixelBudget, RequestLimits, SamplingParams, sampling_defaults
from predictor.protocol import (
    INPUT_METADATA,
    OUTPUT_METADATA,
    Completion,
    ParsedRequest,
    build_infer_response,
    parse_infer_request,
)
from predictor.rows import Row, check_fits
from predictor.settings import Settings

logger = logging.getLogger(__name__)
# The queue place of the request being served (set in __call__, used by predict).
_RESERVATION: ContextVar[Reservation | None] = ContextVar("reservation", default=None)
# The place a REST request took at the door (`admit`, from predictor.server.admission), before its
# body was read; the request path takes it over (`take_reservation`).
_DOOR: ContextVar[Reservation | None] = ContextVar("door_reservation", default=None)


class _NoPlace:
    """What the door hands a request for an unloaded model: nothing to release."""

    held = False

    def release(self) -> None:
        pass


_NO_PLACE = _NoPlace()


@dataclass
class PreparedRequest:
    """A parsed request with its images decoded and resized, ready for the generator."""

    request: InferRequest
    parsed: ParsedRequest
    rows: list[Row]
    decode_ms: int
    arrived: (
        float  # time.monotonic() when preprocessing began: the request's deadline counts from it
    )


@dataclass
class DescribedRequest:
    prepared: PreparedRequest
    completions: list[Completion]
    generate_ms: int


def _ms(start: float) -> int:
    return round((time.perf_counter() - start) * 1000)


class QwenVLModel(Model):
    """Describes images with a Qwen-VL checkpoint over the Open Inference Protocol v2."""

    def __init__(self, settings: Settings, fronts: int = 1, link: FrontLink | None = None):
        super().__init__(settings.model_name)
        self.settings = settings
        self.fronts = fronts  # front processes in front of the engine core (--workers)
        self.link = link  # set: another front started the core; this one attaches to it
        # Called with the engine (before it is ready) by the front that starts the core
        # (`predictor.server.fronts` starts the other fronts there).
        self.on_engine_started: Callable[[RemoteEngine], None] | None = None
        self.image_limits = ImageLimits(
            max_bytes=settings.max_image_bytes, max_decoded_pixels=settings.max_decoded_pixels
        )
        self.generator: Generator | None = None  # in-process layout only
        self.preprocessor: Generator | Preprocessor | None = None  # encodes rows for the engine
        self.inputs: Preprocessor | None = None  # images to patches, conversations to tokens
        self.engine: Engine | RemoteEngine | None = None
        self.guides: GuideCompiler | None = None  # guided decoding: compiles requests' guides
        self.engine_failed: str | None = None  # why the engine process died, if it did
        # Called with that reason when it dies, on the engine's reader thread.
        self.death_listeners: list[Callable[[str], None]] = []
        self.image_workers = ImageWorkers()  # image decoding and the processor, off the loop
        self.draining = False  # set by predictor.server.drain on SIGTERM / SIGINT
        self.loaded_at = 0.0  # time.time() when the model became ready
        self.limits: RequestLimits | None = None
        self._stopped = False
        self._load_started = False
        metrics.touch(self.name)

    def load(self) -> bool:
        """Load the checkpoint, run the warm-up generation, and only then report ready.

        Once per process, at start-up (`predictor.server.main`): nothing on the request path
        calls it (`predictor.server.health.HealthDataPlane.get_model` refuses instead), and a
        second call is refused here too, since a second copy of the weights does not fit a GPU
        sized for one."""
        if self._load_started:
            raise RuntimeError(f"model {self.name} loads once per process, at start-up")
        self._load_started = True
        logger.info("loading model %s from %s", self.name, self.settings.model_dir)
        started = time.perf_counter()
        if self.settings.engine_process:
            return self._load_engine_process(started)
        configure_compile_cache(self.settings.compile_cache_dir if self.settings.compile else None)
        loaded = load_model(self.settings)
        self.generator = Generator(loaded.model, loaded.processor)
        self.generator.vision_cache = VisionCache(
            self.settings.vision_cache_mb * MIB, self.settings.model_name
        )
        self.preprocessor = self.generator
        self.inputs = self.generator.preprocessor
        self.inputs.cache = InputCache(self.settings.input_cache_mb * MIB)
        self.inputs.pixel_dtype = loaded.model.dtype  # what the vision encoder casts to
        self.guides = self._guide_compiler(vocab_size(loaded.model.config))
        self.limits = self._request_limits(
            self.generator.default_budget, self.generator.checkpoint_sampling
        )
        self.engine = Engine(
            self.generator,
            self.name,
            EngineConfig.from_settings(self.settings),
            warm_up=self.settings.warmup,
        )
        self.ready = True
        self.loaded_at = time.time()
        logger.info("model %s ready in %d ms", self.name, _ms(started))
        return self.ready

    def _load_engine_process(self, started: float) -> bool:
        """The model in a process of its own (`predictor.engine.core`); only the processor
        here. Ready once that process has loaded and warmed up."""
        # This process's torch work is the processor's, one image per request thread, in
        # parallel across requests; intra-op threads on top of that oversubscribed the cores
        # (6 request threads x 2 OpenMP threads on 2 cores made the processor 4x slower).
        torch.set_num_threads(1)
        self.preprocessor = self.inputs = Preprocessor(
            load_processor(self.settings), self.settings.input_cache_mb * MIB
        )
        self.guides = self._guide_compiler(load_vocab_size(self.settings))
        self.limits = self._request_limits(
            self.preprocessor.default_budget, load_checkpoint_sampling(self.settings)
        )
        engine = RemoteEngine(self.settings, self.name, self.fronts, self.link)
        engine.on_death = self._engine_died
        self.engine = engine
        try:
            if self.on_engine_started is not None:
                self.on_engine_started(engine)
            engine.wait_ready()
        except StartupError:
            engine.stop()
            raise
        self.inputs.pixel_dtype = engine.pixel_dtype
        self.ready = True
        self.loaded_at = time.time()
        logger.info("model %s ready in %d ms", self.name, _ms(started))
        return self.ready

    def fail(self, detail: str) -> None:
        """Something this process cannot serve without is gone for good (another front's
        process died): as when the engine dies, not live, not ready, 503 for every request,
        so Kubernetes restarts the pod."""
        logger.error("%s: the pod can no longer serve as configured", detail)
        self._engine_died(detail)

    def _guide_compiler(self, vocab: int) -> GuideCompiler:
        assert self.preprocessor is not None
        timeout = self.settings.guide_compile_timeout_s
        return GuideCompiler(self.preprocessor.tokenizer, vocab, timeout_s=timeout)

    def compile_guide(self, sampling: SamplingParams) -> CompiledGuide | None:
        """The request's guide compiled (cached by content), or None for a free request;
        blocks, so it runs on the image worker threads. A guide that does not compile in
        time is a 400 naming its field."""
        if sampling.guide is None:
            return None
        assert self.guides is not None, "compile_guide before load"
        return self.guides.compile(sampling.guide)

    def _engine_died(self, detail: str) -> None:
        """The engine process is gone and will not come back: stop saying ready or live, and
        tell the listeners (`predictor.server.fail_fast`); on the engine's reader thread."""
        self.ready = False
        self.engine_failed = detail
        for listener in self.death_listeners:
            listener(detail)

    def _request_limits(
        self, checkpoint_budget: PixelBudget, checkpoint_sampling: dict[str, Any]
    ) -> RequestLimits:
        cap = self.settings.max_pixels_limit
        default = PixelBudget(
            min_pixels=min(checkpoint_budget.min_pixels, cap),
            max_pixels=min(checkpoint_budget.max_pixels, cap),
        )
        sampling = sampling_defaults(self.settings.generation_config, checkpoint_sampling)
        logger.info("sampling defaults for requests that do not set their own: %s", sampling)
        return RequestLimits(
            max_new_tokens=self.settings.max_new_tokens,
            max_new_tokens_limit=self.settings.max_new_tokens_limit,
            default_budget=default,
            max_pixels_limit=cap,
            max_images_per_request=self.settings.max_images_per_request,
            sampling_defaults=sampling,
            max_model_len=self.settings.max_model_len,
            max_guide_bytes=self.settings.max_guide_bytes,
        )

    def stop(self) -> None:
        """Stop the engine: on an unload through the repository API, and at exit (`main`)."""
        if self._stopped:
            return
        self._stopped = True
        if self.engine is not None:
            self.engine.stop()
        if self.guides is not None:
            self.guides.close()
        super().stop()

    @property
    def alive(self) -> bool:
        """Whether this process can still serve the model: the liveness probe's answer
        (`predictor.server.health`). False once the model was stopped (unloaded through the
        repository API, or at shutdown) or its engine process died: nothing in the process
        builds either again, so only a restart brings it back. Anything else that makes the
        model unrecoverable belongs here."""
        return not self._stopped and self.engine_failed is None

    async def healthy(self) -> bool:
        """KServe's per-model readiness: loaded, and still alive."""
        return self.ready and self.alive

    def serving_refusal(self) -> Unavailable | None:
        """Why a request that holds its place cannot be served (503 + Retry-After), or None.

        Not readiness: readiness goes false at the drain's start, while the requests already
        admitted must still be served. What refuses new requests while draining is the
        engine's admission (`admit`, `take_reservation`), which the doors ask first."""
        if self.engine_failed is not None:
            return EngineUnavailable(self.engine_failed)
        if self._stopped:
            return ModelUnavailable(self.name, "was unloaded")
        if self.engine is None:
            return ModelUnavailable(self.name)
        return None

    # ---- drain (predictor.server.drain) --------------------------------------------------------

    def begin_drain(self) -> None:
        """Stop saying ready and refuse new requests; admitted ones run on."""
        self.draining = True
        self.ready = False
        if self.engine is not None:
            self.engine.refuse_new(ShuttingDown)

    def busy(self) -> bool:
        return self.engine is not None and self.engine.busy

    def end_remaining(self) -> int:
        """The drain ran out of time: end what is left with a 503 (Retry-After)."""
        return self.engine.close(ShuttingDown) if self.engine is not None else 0

    def get_input_types(self) -> list[dict[str, Any]]:
        return INPUT_METADATA

    def get_output_types(self) -> list[dict[str, Any]]:
        return OUTPUT_METADATA

    async def __call__(
        self,
        body: Any,
        headers: dict[str, str] | None = None,
        verb: InferenceVerb = InferenceVerb.PREDICT,
    ) -> Any:
        """KServe's request path, counted by outcome, holding a place in the engine's queue
        from before its images are decoded (a full queue refuses it right here)."""
        with metrics.counted(self.name):
            reservation = self.take_reservation()
            token = _RESERVATION.set(reservation)
            try:
                return await super().__call__(body, headers=headers, verb=verb)
            finally:
                reservation.release()
                _RESERVATION.reset(token)

    def admit(self) -> Reservation | _NoPlace:
        """A place in the engine for a REST request at the door, before its body is read,
        or 503 at once (queue full, draining, engine gone).

        Why take the place here and not only check for one: in a burst at an idle server,
        every request passed a check made before any of them held a place, then read and
        parsed its body, and only then was refused: 70-80 ms to a 503 instead of 15."""
        assert self.engine is not None, "admit before load"
        if self._stopped:  # unloaded: no place to take; the route answers 404 as for any
            return _NO_PLACE  # model the repository does not hold
        with metrics.counted_rejection(self.name):
            reservation = self.engine.reserve()
        _DOOR.set(reservation)
        return reservation

    def take_reservation(self) -> Reservation:
        """The place this request took at its door (REST or gRPC), or a new one."""
        assert self.engine is not None, "called before load"
        door = _DOOR.get(None)
        if door is not None and door.held:
            _DOOR.set(None)
            return door
        return self.engine.reserve()

    def validate(self, payload: Any) -> Any:
        # KServe's default looks for an "inputs" key in dict payloads; ours is already checked.
        return payload

    async def preprocess(
        self, payload: Any, headers: dict[str, str] | None = None
    ) -> PreparedRequest:
        if not isinstance(payload, InferRequest):
            raise InvalidRequest(
                "request", "this model speaks the v2 protocol: POST /v2/models/{name}/infer"
            )
        assert self.limits is not None, "preprocess before load"
        arrived = time.monotonic()
        parsed = parse_infer_request(payload, self.limits, self.settings.default_prompt)
        started = time.perf_counter()
        rows = await self.image_workers.run(self._decode_rows, parsed)
        decode_ms = _ms(started)
        metrics.IMAGE_DECODE_SECONDS.labels(self.name).observe(decode_ms / 1000)
        return PreparedRequest(payload, parsed, rows, decode_ms, arrived)

    def _decode_rows(self, parsed: ParsedRequest) -> list[Row]:
        """Decode, resize and encode every image of a request (runs on a worker thread)."""
        grammar = self.compile_guide(parsed.sampling)  # before the images: a 400 costs less
        rows = []
        for index, (data, prompt) in enumerate(zip(parsed.images, parsed.prompts, strict=True)):
            content = [{"type": "image"}, {"type": "text", "text": prompt}]
            row = Row((), ({"role": "user", "content": content},), parsed.sampling, grammar=grammar)
            fields = (f"image[{index}]",)
            rows.append(self.encode_row(row, (data,), fields, parsed.budget, "max_new_tokens"))
        return rows

    def encode_row(
        self,
        row: Row,
        images: Sequence[bytes],
        fields: Sequence[str],
        budget: PixelBudget,
        length_field: str,
    ) -> Row:
        """A row (its conversation and sampling, no images) with its model inputs: each image
        decoded and patched, or found in the input cache, then the conversation's tokens;
        refused (400, naming `length_field`) if it cannot fit a batch slot. Every route's
        rows come through here, on an image worker thread."""
        inputs = self.inputs
        assert inputs is not None, "encode_row before load"
        processed = []
        for data, field in zip(images, fields, strict=True):
            image, hit = inputs.image(data, self.image_limits, field, budget)
            if inputs.cache.enabled:
                (metrics.INPUT_CACHE_HITS if hit else metrics.INPUT_CACHE_MISSES).labels(
                    self.name
                ).inc()
            processed.append(image)
        row = replace(row, inputs=inputs.encode_processed(row, processed))
        if self.generator is not None:  # one process: the vision encoder runs here too
            row = replace(row, inputs=self.generator.encode_images(row.inputs))
        check_fits(row, self.settings.max_model_len, length_field)
        return row

    async def predict(
        self,
        payload: PreparedRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> DescribedRequest:
        assert self.engine is not None, "predict before load"
        started = time.perf_counter()
        completions = await self.engine.submit(
            payload.rows, arrived=payload.arrived, reservation=_RESERVATION.get(None)
        )
        generate_ms = _ms(started)
        logger.info(
            "request %s: %d images, %d tokens, decode %d ms, generate %d ms",
            payload.parsed.request_id,
            len(completions),
            sum(c.generated_tokens for c in completions),
            payload.decode_ms,
            generate_ms,
        )
        return DescribedRequest(payload, completions, generate_ms)

    async def postprocess(
        self,
        result: DescribedRequest,
        headers: dict[str, str] | None = None,
        response_headers: dict[str, str] | None = None,
    ) -> InferResponse:
        prepared = result.prepared
        return build_infer_response(
            prepared.request,
            prepared.parsed.request_id,
            self.name,
            result.completions,
            timings={"decode_ms": prepared.decode_ms, "generate_ms": result.generate_ms},
        )
