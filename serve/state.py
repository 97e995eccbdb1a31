"""What one server holds at run time: the engine, the adapter table, readiness and the queue.

Start-up runs in the background, so /healthz answers and /readyz says 503 while the engine loads
(tens of seconds). After that a poller adds new registry versions; POST /v1/admin/reload does
the same on demand. Both go through one lock, so an adapter is never loaded twice.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

from PIL import Image

from adapter_contract.manifest import config_sha256
from serve.adapter_merge import AdapterReplaced
from serve.adapters import AdapterEntry, AdapterNotFound, AdapterTable, sync
from serve.engine import Classifier, RequestAborted, VllmClassifier, image_budget_limit, raw_pixel_scale, tower_lora
from serve.errors import ApiError
from serve.images import decode_image
from serve.metrics import Metrics
from serve.schemas import LabelScore, Prediction
from serve.settings import ServeSettings

log = logging.getLogger("petbreed.serve")


@dataclass
class Base:
    path: str
    config_sha256: str
    processor: Any


def load_base(settings: ServeSettings) -> Base:
    """Resolve the base model (a gs:// one is copied to the cache) and read what adapters are
    checked against. Blocking."""
    from transformers import AutoProcessor

    from finetune.model import config_path, resolve_base_model

    path = resolve_base_model(settings.base_model, settings.cache_dir)
    return Base(path, config_sha256(config_path(path)), AutoProcessor.from_pretrained(path))


class ServerState:
    def __init__(self, settings: ServeSettings, metrics: Metrics, classifier: Classifier | None = None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.classifier = classifier
        self.owns_classifier = classifier is None
        self.table: AdapterTable | None = None
        self.ready = False
        self.failed: str | None = None
        self.inflight = 0
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        try:
            await self._start()
        except Exception as err:
            self.failed = f"start-up failed: {err}"
            log.exception("start-up failed")
            return
        self.ready = True
        log.info("ready", extra={"adapters": sorted(e.ref for e in self.tables().entries.values())})
        if self.settings.poll_interval_s > 0:
            self._tasks.append(asyncio.create_task(self._poll()))

    async def _start(self) -> None:
        started = time.perf_counter()
        base = await asyncio.to_thread(load_base, self.settings)
        s = self.settings
        self.table = AdapterTable(
            s.registry, s.cache_dir, base.processor, base.config_sha256, s.vllm.max_lora_rank, s.default_adapter,
            tower_lora=tower_lora(s), merged=s.merged_adapter is not None,
            max_image_soft_tokens=image_budget_limit(s, base.processor),
        )
        if self.classifier is None:
            scale = raw_pixel_scale(s, base.processor)
            observe = self.metrics.observe_stage
            self.classifier = await asyncio.to_thread(VllmClassifier.start, s, base.path, scale, observe)
        await self.reload()
        log.info("engine started", extra={"seconds": round(time.perf_counter() - started, 1), "base": base.path})

    def begin(self) -> None:
        """Start loading in the background (called from the app's lifespan)."""
        self._tasks.append(asyncio.create_task(self.start()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        if self.owns_classifier and self.classifier is not None:
            self.classifier.shutdown()

    async def reload(self) -> dict[str, list[str]]:
        table = self.tables()
        self.engine()  # not started yet: 503, rather than every adapter refused by `_load`
        async with self._lock:
            result = await sync(table, self._load, asyncio.to_thread)
        self.metrics.adapters.labels("loaded").set(len(table.entries))
        self.metrics.adapters.labels("refused").set(len(table.refused))
        return result

    async def _load(self, entry: AdapterEntry) -> None:
        """Load `entry`, then warm up before the table lists it: vLLM's first image at a new image
        budget loads the processor for it and compiles kernels, seconds on a GPU that no client
        should wait for, at start-up or when a new version arrives. Several images at once, so that
        each renderer thread meets its first image here; each render process renders one."""
        classifier = self.engine()
        await classifier.load_adapter(entry)
        started = time.perf_counter()
        if await classifier.warm_up(entry, self.settings.vllm.renderer_workers):
            log.info("warmed up", extra={"adapter": entry.ref, "seconds": round(time.perf_counter() - started, 2)})

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.settings.poll_interval_s)
            try:
                result = await self.reload()
            except Exception:  # a registry hiccup must not end polling
                log.exception("registry poll failed")
                continue
            if result["added"] or result["refused"]:
                log.info("registry poll", extra=result)

    def tables(self) -> AdapterTable:
        if self.table is None:
            raise self.not_ready()
        return self.table

    def engine(self) -> Classifier:
        if self.classifier is None:
            raise self.not_ready()
        return self.classifier

    def not_ready(self) -> ApiError:
        message = self.failed or "the engine is still loading"
        return ApiError(503, "not_ready", message, self.retry_after())

    def retry_after(self) -> dict[str, str]:
        return {"Retry-After": str(self.settings.retry_after_s)}

    def resolve(self, ref: str | None) -> AdapterEntry:
        if not self.ready:
            raise self.not_ready()
        try:
            return self.tables().resolve(ref)
        except AdapterNotFound as err:
            raise ApiError(404, "adapter_refused" if err.refused else "unknown_adapter", str(err)) from None

    @contextmanager
    def admit(self, images: int) -> Iterator[None]:
        """Bounded queue: answer 429 at once rather than let requests pile up and time out."""
        if self.inflight + images > self.settings.queue_size:
            self.metrics.rejected.inc()
            raise ApiError(
                429, "queue_full", f"{self.inflight} images are in flight (limit {self.settings.queue_size})",
                self.retry_after(),
            )
        self.inflight += images
        self.metrics.queue_depth.set(self.inflight)
        try:
            yield
        finally:
            self.inflight -= images
            self.metrics.queue_depth.set(self.inflight)

    async def predict(self, images: Sequence[bytes], ref: str | None, top_k: int) -> tuple[str, list[Prediction]]:
        """The one prediction path every route takes. The adapter entry is resolved here, once:
        a version published meanwhile does not change this request's answer."""
        if len(images) > self.settings.max_images:
            raise ApiError(
                422, "too_many_images", f"{len(images)} images sent; at most {self.settings.max_images} per request"
            )
        entry = self.resolve(ref)
        with self.admit(len(images)):
            started = time.perf_counter()
            decoded = await asyncio.to_thread(self._decode_all, images)
            self.metrics.observe_stage("decode", time.perf_counter() - started)
            distributions = await self._classify(decoded, entry, top_k)
        predictions = [self._prediction(entry, probs, top_k) for probs in distributions]
        self.metrics.predictions.labels(entry.ref).inc(len(predictions))
        self.metrics.uncertain.labels(entry.ref).inc(sum(p.uncertain for p in predictions))
        return entry.ref, predictions

    async def _classify(self, images: list[Image.Image], entry: AdapterEntry, top_k: int) -> list[list[float]]:
        engine = self.engine()
        try:
            return await engine.classify(images, entry, top_k)
        except AdapterReplaced as err:
            raise ApiError(503, "adapter_replaced", str(err), self.retry_after()) from None
        except RequestAborted as err:
            raise ApiError(503, "request_aborted", str(err), self.retry_after()) from None
        except Exception:
            if self.engine_died():
                log.exception("engine died")
                raise self.not_ready() from None
            raise

    def engine_died(self) -> bool:
        """Whether the vLLM engine has died. Not recoverable in-process: from then on liveness fails
        too, so that the platform restarts us."""
        if self.classifier is None or not self.classifier.dead():
            return False
        self.ready, self.failed = False, "the vLLM engine died; see the logs"
        return True

    def _decode_all(self, images: Sequence[bytes]) -> list[Image.Image]:
        return [decode_image(data, self.settings.max_pixels) for data in images]

    def _prediction(self, entry: AdapterEntry, probs: list[float], top_k: int) -> Prediction:
        labels = entry.manifest.labels.labels
        order = sorted(range(len(labels)), key=lambda i: -probs[i])
        scores = [
            LabelScore(label=labels[i].id, text=labels[i].text, species=labels[i].species, probability=_clip(probs[i]))
            for i in order[:top_k]
        ]
        best = scores[0]
        return Prediction(
            label=best.label, text=best.text, species=best.species, confidence=best.probability,
            uncertain=best.probability < self.settings.uncertain_below, top_k=scores,
        )


def _clip(p: float) -> float:
    # Products of renormalised floats can land a hair outside [0, 1].
    return min(1.0, max(0.0, p))
