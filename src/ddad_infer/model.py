"""An exported model (``ddad export RUN --format onnx|openvino``), whatever its method, loaded for scoring
without torch: images in, ``pred_score`` / ``pred_label`` / ``anomaly_map`` / ``pred_mask`` out, as
``ddad predict`` gives them.

    model = ddad_infer.load("runs/washer/export")
    for r in model.predict(["part-001.png"]):
        print(r.image, r.pred_score, r.pred_label)

The folder is self-contained: graphs, the method's own settings (DDAD: sampler and schedule; PatchCore: its
memory banks), the calibrated scorer and the decisions chosen under the run's calibration key. Loading checks
each file against the SHA-256 in the manifest (a missing, truncated or swapped file is named) and refuses
decisions chosen under other settings. :class:`ExportedModel` holds what every method shares (manifest,
graphs, decisions, reading images); each method's model says how images become scores and maps.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .backends import open_graph
from .decisions import DecisionTable
from .images import DatasetError, load_image
from .inpainting import GRAPHS as REFINEMENT_GRAPHS
from .inpainting import Refinement

MANIFEST = "export.json"
FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8")


class ExportError(ValueError):
    """An exported folder that cannot be trusted to score like its run; the message names the file."""


@dataclass
class Prediction:
    """One image's result (anomalib's names): raw ``score``, ``pred_score`` in [0, 1] with 0.5 at the
    threshold, ``pred_label`` (score >= threshold), ``anomaly_map`` (H, W) and ``pred_mask`` (H, W) at the
    model's size, the ``reconstruction`` (C, H, W) in [-1, 1] where the method makes one (DDAD; DRDC's inpainting), and the
    ``category`` it was decided as (given, the model's only one, or recognised; None: the shared decision)."""

    image: str
    score: float
    threshold: float | None
    pred_score: float | None
    pred_label: bool | None
    anomaly_map: np.ndarray
    pred_mask: np.ndarray | None
    reconstruction: np.ndarray | None
    category: str | None = None


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict:
    path = folder / MANIFEST
    if not path.is_file():
        raise ExportError(f"{path} not found: {folder} is not a folder written by `ddad export`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ExportError(f"{path} is not a valid manifest: {exc}") from None
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise ExportError(f"{path} has format version {version!r}; this runtime reads version {FORMAT_VERSION}: "
                          "export the run again with the ddad that matches this runtime")
    return manifest


def model_kind(manifest: dict) -> str | None:
    """How the folder's graphs make a score: ``diffusion`` (DDAD), ``bank`` (PatchCore, DRDC's memory-bank
    base) or ``graph`` (one graph from image to map: DRDC's transformer base)."""
    return manifest.get("model") or ("diffusion" if manifest.get("method") == "ddad" else None)  # DDAD's first exports


def checked_file(folder: Path, manifest: dict, entry: dict) -> list[Path]:
    """The files of a manifest ``entry`` ({files, sha256}), each present and equal (SHA-256) to what the
    export wrote; a manifest names files inside its folder, never elsewhere."""
    paths = []
    for file, digest in zip(entry["files"], entry["sha256"], strict=True):
        path = folder / Path(file).name
        if not path.is_file():
            raise ExportError(f"graph file {path} is missing (listed in {folder / MANIFEST})")
        if file_sha256(path) != digest:
            raise ExportError(f"graph file {path} is not the one this export wrote (its SHA-256 differs from "
                              f"{folder / MANIFEST}): corrupt, or copied from another export; export the run again")
        paths.append(path)
    return paths


def checked_files(folder: Path, manifest: dict, name: str, backend: str, precision: str = "fp32") -> list[Path]:
    """The graph ``name``'s files for ``backend`` and ``precision`` (OpenVINO: its IR where the export wrote
    one, else the ONNX graph, which it reads too; int8: the IR quantised by ``ddad export --int8``), each
    present and equal (SHA-256) to what the export wrote."""
    kinds = (manifest.get("graphs") or {}).get(name) or {}
    if precision == "int8":
        if backend != "openvino":
            raise ExportError("INT8 graphs run in OpenVINO: use --backend openvino")
        entry = kinds.get("openvino-int8")
        if entry is None:
            raise ExportError(f"{folder / MANIFEST} lists no INT8 {name} graph: export with --format openvino --int8")
    else:
        entry = kinds.get("openvino") if backend == "openvino" and "openvino" in kinds else kinds.get("onnx")
    if entry is None:
        raise ExportError(f"{folder / MANIFEST} lists no {name} graph")
    return checked_file(folder, manifest, entry)


class ExportedModel:
    """An exported model ready to score (:func:`load` picks the subclass of the manifest's ``model`` kind:
    diffusion, bank or graph). A subclass names its ``GRAPHS`` (opened into :attr:`graphs`, name ->
    callable), which of them ``ddad export --int8`` quantises (``QUANTISED``), and implements
    :meth:`score_batch`. A manifest with a ``refinement`` (DRDC's diffusion refinement) adds its graphs and
    refines every batch's map (:class:`ddad_infer.inpainting.Refinement`)."""

    KIND = ""
    GRAPHS: tuple[str, ...] = ()
    QUANTISED: tuple[str, ...] = ()

    def __init__(self, folder: Path | str, backend: str | None = None, threads: int | None = None,
                 precision: str = "fp32") -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.folder, self.precision = Path(folder), precision
        self.manifest = manifest = read_manifest(self.folder)
        if model_kind(manifest) != self.KIND:
            raise ExportError(f"{self.folder / MANIFEST} holds a {model_kind(manifest)!r} model, not {self.KIND!r}")
        self.backend = backend or ("openvino" if manifest["format"] == "openvino" else "onnxruntime")
        self.image_size, self.channels = int(manifest["image_size"]), int(manifest["channels"])
        self.batch_size = int(manifest.get("batch_size") or 8)
        self.key = manifest.get("calibration_key")
        stored = manifest.get("decisions")
        if stored is not None and manifest.get("decisions_key") != self.key:
            raise ExportError(f"{self.folder / MANIFEST}: its decisions were chosen under calibration key "
                              f"{manifest.get('decisions_key')}, its graphs are {self.key}: thresholds from other "
                              "settings would decide wrongly; export the run again after `ddad test`")
        self.decisions = None if stored is None else DecisionTable.from_stored(stored)
        self.categories = list(manifest.get("categories") or [])  # a model of several: one decision each
        recognition = manifest.get("recognition")
        self.references = self.labels = None
        if recognition is not None:  # reference embeddings (R, E), L2-normalised, and their categories
            self.references = np.load(checked_file(self.folder, manifest, recognition)[0], allow_pickle=False)
            self.labels = list(recognition["labels"])
        record = manifest.get("int8") or {}
        if precision == "int8" and isinstance(record.get("decisions"), dict):  # chosen on INT8 validation scores
            if record["decisions"].get("calibration_key") != self.key:
                raise ExportError(f"{self.folder / MANIFEST}: its INT8 decisions were chosen under other settings "
                                  "than its graphs: export the run again")
            self.decisions = DecisionTable.from_stored(record["decisions"])
        if precision == "int8" and record.get("within_tolerance") is False:
            warnings.warn(f"the INT8 graphs of {self.folder} move the anomaly maps by {record['max_map_error']:.1%} "
                          f"of their range on defect-free images (tolerance {record['tolerance']:.0%}): measure them "
                          "on your own images before trusting their decisions", stacklevel=2)
        self.graphs = {}
        refinement = manifest.get("refinement")
        for name in self.GRAPHS + (REFINEMENT_GRAPHS if refinement else ()):
            quantised = precision == "int8" and name in self.QUANTISED
            path = checked_files(self.folder, manifest, name, self.backend, "int8" if quantised else "fp32")[0]
            self.graphs[name] = open_graph(path, self.backend, threads)
        self.refinement = Refinement(refinement, self.graphs) if refinement else None

    def score(self, images: np.ndarray, categories: Sequence[str | None] | None = None) -> dict:
        """Raw results of (N, C, H, W) float32 images in [-1, 1] at the model's size, batch by batch
        (:meth:`score_batch`): ``score`` (N,), ``anomaly_map`` (N, 1, H, W), where the method makes one
        ``reconstruction`` (N, C, H, W), and the ``categories`` the images were scored as (:meth:`resolve`)."""
        images = self.check_images(images)
        given = list(categories) if categories is not None else [None] * len(images)
        parts = []
        for start in range(0, len(images), self.batch_size):
            names = given[start:start + self.batch_size]
            batch = np.ascontiguousarray(images[start:start + self.batch_size])
            part = self.score_batch(batch, names)
            if self.refinement is not None:  # the base map (scaled) fused with the diffusion heatmap (Eq. 17)
                part.update(self.refinement(batch, part["anomaly_map"]))
            parts.append({"categories": names, **part})  # the method's resolved ones replace the given ones
        out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "categories"}
        out["categories"] = [c for p in parts for c in p["categories"]]
        return out

    def score_batch(self, x: np.ndarray, categories: list[str | None]) -> dict:
        """One batch's arrays (the keys of :meth:`score`; ``categories`` where the method resolves them)."""
        raise NotImplementedError

    def resolve(self, categories: Sequence[str | None] | None, n: int,
                embeddings: np.ndarray | None = None) -> list[str | None]:
        """Each image's category as ``ddad`` resolves it: the one given (one of the model's), else the model's
        only one, else the category of the nearest reference embedding (cosine; the run's recogniser), else
        None (the shared decision)."""
        known = list(categories) if categories is not None else [None] * n
        if len(known) != n:
            raise ValueError(f"{len(known)} categories for {n} images")
        for c in known:
            if c is not None and self.categories and c not in self.categories:
                raise ValueError(f"category {c!r} is not one of this model's: {', '.join(self.categories)}")
        if len(self.categories) == 1:
            return [self.categories[0] if c is None else c for c in known]
        unknown = [i for i, c in enumerate(known) if c is None]
        if unknown and self.references is not None and embeddings is not None:
            queries = embeddings[unknown].astype(np.float32)
            queries = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
            for i, j in zip(unknown, (queries @ self.references.T).argmax(axis=1)):
                known[i] = self.labels[j]
        return known

    def check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images, dtype=np.float32)
        expected = (self.channels, self.image_size, self.image_size)
        if images.ndim != 4 or images.shape[1:] != expected:
            raise ValueError(f"images must be (N, {', '.join(map(str, expected))}) for this model, got {images.shape}")
        return images

    def predict_arrays(self, images: np.ndarray, categories: Sequence[str | None] | None = None) -> dict:
        """:meth:`score` and the decisions: ``pred_score``, ``pred_label``, ``pred_mask`` (None without stored
        decisions, or without pixel thresholds for the mask)."""
        out = self.score(images, categories)
        out.setdefault("reconstruction", None)
        cats = out["categories"]
        if self.decisions is None:
            return {**out, "pred_score": None, "pred_label": None, "pred_mask": None, "threshold": None}
        decided = self.decisions.decide(out["score"], out["anomaly_map"], cats)
        return {**out, **decided, "threshold": self.decisions.thresholds(cats)}

    def predict(self, paths: Iterable[Path | str], category: str | None = None,
                unreadable: list | None = None) -> list[Prediction]:
        """Each image file read as the run reads it (:func:`ddad_infer.images.load_image`), scored and decided.
        ``unreadable``: a list that collects (path, error) of files that cannot be decoded, which are then
        skipped (by default they raise)."""
        results: list[Prediction] = []
        pending = [Path(p) for p in paths]
        while pending:
            batch, images = [], []
            while pending and len(batch) < self.batch_size:
                p = pending.pop(0)
                try:
                    images.append(load_image(p, self.channels, self.image_size))
                    batch.append(p)
                except DatasetError as exc:
                    if unreadable is None:
                        raise
                    unreadable.append((p, str(exc)))
            if not batch:
                continue
            out = self.predict_arrays(np.stack(images), [category] * len(batch))
            pick = lambda k, i: None if out[k] is None else out[k][i]  # noqa: E731
            for i, p in enumerate(batch):
                results.append(Prediction(
                    image=str(p), score=float(out["score"][i]),
                    threshold=None if out["threshold"] is None else float(out["threshold"][i]),
                    pred_score=None if out["pred_score"] is None else float(out["pred_score"][i]),
                    pred_label=None if out["pred_label"] is None else bool(out["pred_label"][i]),
                    anomaly_map=out["anomaly_map"][i, 0],
                    pred_mask=None if out["pred_mask"] is None else out["pred_mask"][i, 0],
                    reconstruction=pick("reconstruction", i), category=out["categories"][i]))
        return results
