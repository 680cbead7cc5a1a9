"""The service's HTTP API (FastAPI): what each route answers, the limits on what it accepts, the token.

    POST /v1/predict   one or several images (multipart fields ``image``, or one raw body with an image
                       content type), optional ``category`` (form field or query); ``?maps=1`` adds the anomaly
                       map and pred_mask as base64 PNGs at each image's own size
    GET  /v1/model     method, settings, calibration key, decisions, categories
    GET  /healthz      alive;  GET /readyz  loaded and warmed (503 before)
    GET  /metrics      Prometheus text: requests, errors by kind, latency, batch sizes, queue depth
    GET  /             the operator page (no external assets)

Every image is decoded from its content (PNG, JPEG, BMP, TIFF; never from its name), within a byte and a
pixel limit, exactly as ``ddad predict`` reads files (:func:`ddad_infer.images.load_image`); a bad one is
answered 422 naming the problem. With a token, /v1/*, /metrics and the page need ``Authorization: Bearer``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from ddad_infer.images import DatasetError, load_image
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batcher import MicroBatcher, QueueFull
from .page import PAGE
from .predictor import Decided, Predictor

FORMATS = ("PNG", "JPEG", "BMP", "TIFF")
OPEN = ("/healthz", "/readyz")


@dataclass(frozen=True)
class ServeConfig:
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for others
    max_queue: int = 64  # images waiting at most; beyond, 503 with Retry-After
    timeout_s: float = 120.0  # per request (queue and inference): 504 after
    max_upload_mb: float = 32.0  # bytes of one request body
    max_image_pixels: int = 40_000_000  # decoded pixels of one image
    max_images: int = 64  # images in one request
    token: str | None = None
    decision_log: Path | None = None  # JSON lines, one per decided image, flushed each


class Refused(Exception):
    def __init__(self, status: int, kind: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.headers = status, kind, headers or {}


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ddad_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.errors = Counter("ddad_errors", "refused or failed requests by kind", ["kind"], registry=r)
        self.latency = Histogram("ddad_predict_seconds", "latency of /v1/predict", registry=r,
                                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.batches = Histogram("ddad_batch_size", "images per inference batch", registry=r,
                                 buckets=(1, 2, 4, 8, 16, 32, 64))
        self.images = Counter("ddad_images", "images decided", registry=r)
        self.queue = Gauge("ddad_queue_depth", "images waiting for inference", registry=r)
        self.in_flight = Gauge("ddad_in_flight", "predict requests accepted and not yet answered", registry=r)


def _png(array: np.ndarray, size: tuple[int, int], nearest: bool) -> str:
    im = Image.fromarray(array).resize(size, Image.NEAREST if nearest else Image.BILINEAR)
    buffer = io.BytesIO()
    im.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _answer(name: str, d: Decided, key: str, own_size: tuple[int, int], maps: bool, timings: dict) -> dict:
    out = {"name": name, "pred_score": d.pred_score, "pred_label": d.pred_label,
           "decision": None if d.pred_label is None else ("defective" if d.pred_label else "good"),
           "score": d.score, "threshold": d.threshold, "threshold_source": d.threshold_source,
           "calibration_key": key, "category": d.category, "timings_ms": timings}
    if maps:  # the map as 8 bits over [0, its maximum] (the range is given), the mask as 0 / 255
        top = float(max(d.anomaly_map.max(), 1e-12))
        scaled = np.clip(d.anomaly_map / top * 255.0, 0, 255).astype(np.uint8)
        out.update(anomaly_map_png=_png(scaled, own_size, False), anomaly_map_range=[0.0, top],
                   pred_mask_png=None if d.pred_mask is None else _png(d.pred_mask.astype(np.uint8) * 255, own_size, True))
    return out


def create_app(predictor: Predictor, config: ServeConfig = ServeConfig()) -> FastAPI:
    metrics = Metrics()
    batcher = MicroBatcher(lambda images, cats: predictor(np.stack(images), cats), predictor.batch_size,
                           config.max_wait_ms / 1000, config.max_queue,
                           on_batch=lambda size, seconds: metrics.batches.observe(size))
    state = {"ready": False}
    log = open(config.decision_log, "a", encoding="utf-8") if config.decision_log else None

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        size = predictor.image_size
        await batcher.run_alone([np.zeros((predictor.channels, size, size), np.float32)], [None])  # warm-up
        state["ready"] = True
        yield
        state["ready"] = False
        await batcher.stop()
        if log is not None:
            log.close()

    app = FastAPI(title="ddad", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        route = request.url.path
        try:
            if config.token is not None and route not in OPEN:
                given = request.headers.get("authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {config.token}".encode()):
                    raise Refused(401, "unauthorised", "this server needs its token: Authorization: Bearer TOKEN")
            response = await call_next(request)
        except Refused as exc:
            metrics.errors.labels(exc.kind).inc()
            response = JSONResponse({"error": str(exc), "kind": exc.kind}, exc.status, headers=exc.headers)
        metrics.requests.labels(route if route in ("/", "/v1/predict", "/v1/model", *OPEN, "/metrics") else "other",
                                str(response.status_code)).inc()
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        metrics.errors.labels(exc.kind).inc()
        return JSONResponse({"error": str(exc), "kind": exc.kind}, exc.status, headers=exc.headers)

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz():
        return JSONResponse({"ready": state["ready"]}, 200 if state["ready"] else 503)

    @app.get("/v1/model")
    async def model():
        return predictor.info

    @app.get("/metrics")
    async def prometheus():
        metrics.queue.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE

    async def uploads(request: Request) -> tuple[list[tuple[str, bytes]], str | None]:
        length = request.headers.get("content-length")
        if length is None:
            raise Refused(411, "no_length", "send the request with a Content-Length")
        if int(length) > config.max_upload_mb * 2**20:
            raise Refused(413, "too_large", f"the request has {int(length) / 2**20:.1f} MiB; this server takes at "
                                            f"most {config.max_upload_mb:g} MiB a request")
        category = request.query_params.get("category")
        kind = request.headers.get("content-type", "")
        if kind.startswith("multipart/form-data"):
            async with request.form(max_files=config.max_images, max_fields=8) as form:  # closes its files after
                files = [(f.filename or f"image-{i}", await f.read()) for i, f in enumerate(form.getlist("image"))
                         if hasattr(f, "read")]
                category = form.get("category") if isinstance(form.get("category"), str) else category
        elif kind.startswith("image/") or kind == "application/octet-stream":
            files = [("body", await request.body())]
        else:
            raise Refused(415, "media_type", f"send images as multipart/form-data fields 'image' or as a raw body "
                                             f"with an image content type, not {kind or 'no content type'}")
        if not files:
            raise Refused(422, "no_image", "the request holds no image (multipart field 'image')")
        return files, category or None

    def decode(name: str, data: bytes) -> tuple[np.ndarray, tuple[int, int]]:
        try:
            with Image.open(io.BytesIO(data), formats=FORMATS) as header:
                own = header.size
        except Exception:
            own = (0, 0)  # load_image below names the problem
        image = load_image(io.BytesIO(data), predictor.channels, predictor.image_size, name=name, formats=FORMATS,
                           max_pixels=config.max_image_pixels)
        return image, own

    @app.post("/v1/predict")
    async def predict(request: Request, maps: bool = False):
        with metrics.in_flight.track_inprogress():
            return await decide(request, maps)

    async def decide(request: Request, maps: bool) -> dict:
        start = time.perf_counter()
        files, category = await uploads(request)
        try:
            predictor.check_category(category)
        except ValueError as exc:
            raise Refused(422, "category", str(exc)) from None
        decoded = []
        for name, data in files:
            try:
                decoded.append(await asyncio.to_thread(decode, name, data))
            except DatasetError as exc:
                raise Refused(422, "bad_image", str(exc)) from None
        decode_ms = (time.perf_counter() - start) * 1000
        try:
            futures = [batcher.submit(image, category) for image, _ in decoded]
        except QueueFull as exc:
            raise Refused(503, "queue_full", f"busy: {exc}; retry shortly", {"Retry-After": "1"}) from None
        try:
            done = await asyncio.wait_for(asyncio.gather(*futures), config.timeout_s)
        except asyncio.TimeoutError:
            for f in futures:
                f.cancel()
            raise Refused(504, "timeout", f"no answer within {config.timeout_s:g} s") from None
        answers = []
        for (name, data), (_, own), (decided, queued, inference) in zip(files, decoded, done):
            timings = {"decode": round(decode_ms, 2), "queue": round(queued * 1000, 2),
                       "inference": round(inference * 1000, 2), "total": round((time.perf_counter() - start) * 1000, 2)}
            answers.append(_answer(name, decided, predictor.key, own, maps, timings))
            if log is not None:
                log.write(json.dumps({"time": time.time(), "sha256": hashlib.sha256(data).hexdigest(), "name": name,
                                      **{k: answers[-1][k] for k in ("category", "score", "pred_score", "pred_label",
                                                                     "threshold", "calibration_key")}}) + "\n")
                log.flush()
        metrics.images.inc(len(answers))
        metrics.latency.observe(time.perf_counter() - start)
        return {"results": answers}

    return app
