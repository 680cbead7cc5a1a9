"""`ddad serve`: a real server on a loopback port (uvicorn in a thread) and a real HTTP client (urllib): answers
equal to `ddad predict`'s, health and metrics, micro-batching counted and batch-independent, a full queue
answered 503, each kind of bad input its status and message, the token, the decision log."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
import urllib.error
import urllib.request
import uuid
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ddad.cli import main

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

CATEGORIES = ("stripes", "washer")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A PatchCore run of two categories (no training: quick), tested so that it holds decisions."""
    from ddad.data.synth import SynthConfig, generate

    root = tmp_path_factory.mktemp("serve")
    generate(root / "data", SynthConfig(size=32, train=12, test_good=3, test_defective_per_type=1, seed=3))
    run = root / "run"
    assert main(["train", "--method", "patchcore", "--data-root", str(root / "data"), "--category",
                 ",".join(CATEGORIES), "--image-size", "32", "--backbone", "resnet18", "--backbone-weights", "random",
                 "--set", "bank.fraction=0.25", "--set", "runtime.batch_size=8", "--run-dir", str(run), "--quiet"]) == 0
    assert main(["test", str(run), "--quiet", "--no-images"]) == 0
    return root, run


@pytest.fixture(scope="module")
def predictor(run):
    from ddad.serving.predictor import Predictor

    return Predictor(run[1])


@contextmanager
def serving(predictor, **settings):
    """The app on 127.0.0.1 at a free port, in a thread; yields its base URL; stops it (graceful) after."""
    import uvicorn

    from ddad.serving.app import ServeConfig, create_app

    server = uvicorn.Server(uvicorn.Config(create_app(predictor, ServeConfig(**settings)), host="127.0.0.1", port=0,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "the server did not start"
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def call(url: str, data: bytes | None = None, headers: dict | None = None, method: str | None = None):
    """(status, headers, parsed JSON or text) of one request."""
    request = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            status, head, body = response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        status, head, body = exc.code, dict(exc.headers), exc.read()
    try:
        return status, head, json.loads(body)
    except ValueError:
        return status, head, body.decode()


def multipart(files: list[tuple[str, bytes]], fields: dict | None = None) -> tuple[bytes, dict]:
    boundary = uuid.uuid4().hex
    parts = []
    for key, value in (fields or {}).items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    for name, data in files:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n'
                     f'Content-Type: application/octet-stream\r\n\r\n'.encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict(base: str, files: list[tuple[str, bytes]], category: str | None = None, query: str = "", headers=None):
    body, head = multipart(files, {"category": category} if category else None)
    return call(f"{base}/v1/predict{query}", body, {**head, **(headers or {})})


def _test_images(root: Path) -> list[Path]:
    return sorted((root / "data").rglob("test/*/*.png"))


def test_answers_equal_ddad_predict(run, predictor, tmp_path):
    root, run_dir = run
    assert main(["predict", str(run_dir), str(root / "data"), "--out", str(tmp_path / "p"), "--quiet",
                 "--no-images", "--exclude", "train/*"]) == 0
    expected = {Path(r["image"]).resolve(): r for r in csv.DictReader(open(tmp_path / "p" / "scores.csv"))}
    files = _test_images(root)
    assert set(files) <= set(expected)
    with serving(predictor) as base:
        for p in files:
            status, _, body = predict(base, [(p.name, p.read_bytes())], category=p.parents[2].name)
            assert status == 200, body
            (r,) = body["results"]
            e = expected[p.resolve()]
            assert r["score"] == pytest.approx(float(e["score"]), rel=1e-5)
            assert r["pred_score"] == pytest.approx(float(e["pred_score"]), abs=1e-5)
            assert (int(r["pred_label"]), r["decision"], r["category"]) == (int(e["pred_label"]), e["decision"],
                                                                           e["category"])
            assert r["threshold"] == pytest.approx(float(e["threshold"])) and r["threshold_source"] == e["threshold_source"]
    labels = [int(r["pred_label"]) for p, r in expected.items() if p in files]
    assert 0 < sum(labels) < len(labels)  # both decisions occur: the comparison means something


def test_health_ready_model_metrics_and_maps(run, predictor, tmp_path):
    root, run_dir = run
    image = _test_images(root)[0]
    with serving(predictor) as base:
        assert call(f"{base}/healthz")[2] == {"status": "alive"}
        assert call(f"{base}/readyz")[:3:2] == (200, {"ready": True})
        model = call(f"{base}/v1/model")[2]
        stored = json.loads((run_dir / "threshold.json").read_text())
        assert model["calibration_key"] == stored["calibration_key"] and model["method"] == "patchcore"
        assert model["categories"] == list(CATEGORIES)
        status, _, body = predict(base, [("part.png", image.read_bytes())], query="?maps=1")
        (r,) = body["results"]
        heat = Image.open(io.BytesIO(__import__("base64").b64decode(r["anomaly_map_png"])))
        assert heat.size == Image.open(image).size and r["timings_ms"]["total"] > 0
        metrics = call(f"{base}/metrics")[2]
    assert 'ddad_requests_total{route="/v1/predict",status="200"} 1.0' in metrics
    assert "ddad_batch_size_count 1.0" in metrics and "ddad_queue_depth 0.0" in metrics
    assert "ddad_in_flight 0.0" in metrics


def test_concurrent_requests_are_batched_and_score_as_alone(run, predictor):
    root, _ = run
    files = _test_images(root)[:6]
    with serving(predictor, max_wait_ms=500) as base:
        alone = [predict(base, [(p.name, p.read_bytes())], category=p.parents[2].name)[2]["results"][0]["score"]
                 for p in files]
        answers: dict = {}
        threads = [threading.Thread(target=lambda i=i, p=p: answers.__setitem__(i, predict(
            base, [(p.name, p.read_bytes())], category=p.parents[2].name))) for i, p in enumerate(files)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        metrics = call(f"{base}/metrics")[2]
    together = [answers[i][2]["results"][0]["score"] for i in range(len(files))]
    assert together == pytest.approx(alone, rel=1e-5)
    count = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("ddad_batch_size_count")))
    total = float(next(line.split()[-1] for line in metrics.splitlines() if line.startswith("ddad_batch_size_sum")))
    assert total == 2 * len(files) and count < 2 * len(files) - 1  # the concurrent six in fewer than six batches


class Gated:
    """The real predictor, held at its door until the test opens it."""

    def __init__(self, inner) -> None:
        self.inner, self.entered, self.gate = inner, threading.Event(), threading.Event()
        for name in ("channels", "image_size", "batch_size", "key", "info", "decisions", "check_category"):
            setattr(self, name, getattr(inner, name))

    def __call__(self, images, categories):
        if len(images) == 1 and not images.any():  # the warm-up passes
            return self.inner(images, categories)
        self.entered.set()
        assert self.gate.wait(60)
        return self.inner(images, categories)


def test_a_full_queue_answers_503_and_every_accepted_request_is_answered(run, predictor):
    root, _ = run
    data = _test_images(root)[0].read_bytes()
    gated = Gated(predictor)
    with serving(gated, max_queue=2, max_wait_ms=0) as base:
        results: list = []
        first = threading.Thread(target=lambda: results.append(predict(base, [("a.png", data)])))
        first.start()
        assert gated.entered.wait(30)  # the first image is in inference, held
        waiting = [threading.Thread(target=lambda: results.append(predict(base, [("b.png", data)]))) for _ in range(2)]
        for t in waiting:
            t.start()
        deadline = time.time() + 30
        while "ddad_queue_depth 2.0" not in call(f"{base}/metrics")[2] and time.time() < deadline:
            time.sleep(0.05)
        status, headers, body = predict(base, [("c.png", data)])
        assert status == 503 and headers.get("retry-after", headers.get("Retry-After")) == "1"
        assert body["kind"] == "queue_full" and "retry" in body["error"]
        gated.gate.set()
        for t in [first, *waiting]:
            t.join(60)
    assert [r[0] for r in results] == [200, 200, 200]


def _image(size: tuple[int, int], fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("L", size).save(buffer, fmt)
    return buffer.getvalue()


def test_bad_input_gets_its_status_and_a_message_never_a_traceback(run, predictor):
    with serving(predictor, max_upload_mb=0.05, max_image_pixels=1_000_000) as base:
        cases = [  # (answer, status, what the message must say)
            (predict(base, [("photo.png", b"\x89PNG not really an image")]), 422, ["photo.png", "not an image"]),
            (predict(base, [("photo.png", _image((32, 32), "GIF"))]), 422, ["photo.png", "PNG, JPEG, BMP, TIFF"]),
            (predict(base, [("big.png", _image((1500, 1000)))]), 422, ["big.png", "1500 x 1000 = 2 megapixels"]),
            (predict(base, [("huge.png", np.random.default_rng(0).bytes(60_000))]), 413, ["at most 0.05 MiB"]),
            (call(f"{base}/v1/predict", b"{}", {"Content-Type": "application/json"}), 415, ["multipart/form-data"]),
            (predict(base, [("a.png", _image((32, 32)))], category="gears"), 422, ["'gears' is not one of"]),
            (call(f"{base}/v1/predict", *multipart([], {"note": "no image"})), 422, ["holds no image"]),
        ]
        for (status, _, body), expected, fragments in cases:
            assert status == expected, body
            assert all(f in body["error"] for f in fragments) and "Traceback" not in json.dumps(body), body
        assert predict(base, [("a.jpg", _image((32, 32), "JPEG"))])[0] == 200  # a JPEG named .jpg, read by content
        assert call(f"{base}/readyz")[0] == 200  # still serving


def test_a_token_guards_everything_but_health_and_the_cli_requires_one_off_localhost(run, predictor, tmp_path, capsys):
    token = "s3cret-token-of-the-line-0123"
    with serving(predictor, token=token) as base:
        assert call(f"{base}/healthz")[0] == 200
        assert call(f"{base}/v1/model")[0] == 401
        assert call(f"{base}/v1/model", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{base}/v1/model", headers={"Authorization": f"Bearer {token}"})[0] == 200
        image = _test_images(run[0])[0].read_bytes()
        assert predict(base, [("a.png", image)])[0] == 401
        assert predict(base, [("a.png", image)], headers={"Authorization": f"Bearer {token}"})[0] == 200
    assert main(["serve", str(run[1]), "--host", "0.0.0.0"]) == 2
    assert "give a --token-file" in capsys.readouterr().err


def test_the_decision_log_holds_every_decision(run, predictor, tmp_path):
    files = _test_images(run[0])[:3]
    log = tmp_path / "decisions.jsonl"
    with serving(predictor, decision_log=log) as base:
        status, _, body = predict(base, [(p.name, p.read_bytes()) for p in files])
        assert status == 200 and len(body["results"]) == 3
        lines = [json.loads(line) for line in log.read_text().splitlines()]  # written before the answer
    import hashlib

    assert [line["sha256"] for line in lines] == [hashlib.sha256(p.read_bytes()).hexdigest() for p in files]
    assert [line["score"] for line in lines] == [r["score"] for r in body["results"]]
    assert all(line["calibration_key"] == predictor.key for line in lines)


def test_sigterm_answers_every_accepted_request_then_exits(run, tmp_path):
    """The real command in a process of its own: requests waiting in the queue when SIGTERM arrives are all
    answered (200, with their scores), then the process ends and the port is closed."""
    import signal
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ddad", "serve", str(run[1]), "--port", str(port),
                               "--max-wait-ms", "3000", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if call(f"{base}/readyz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        files = _test_images(run[0])[:4]
        answers: list = []
        threads = [threading.Thread(target=lambda p=p: answers.append(predict(base, [(p.name, p.read_bytes())])))
                   for p in files]
        for t in threads:
            t.start()
        while f"ddad_in_flight {len(files)}.0" not in call(f"{base}/metrics")[2] and time.time() < deadline:
            time.sleep(0.02)  # all accepted; they wait for their batch (3 s)
        server.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert server.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    finally:
        server.kill()
    assert [a[0] for a in answers] == [200] * len(files)
    assert all(len(a[2]["results"]) == 1 and a[2]["results"][0]["score"] > 0 for a in answers)
    with pytest.raises(OSError):
        call(f"{base}/healthz")


def test_the_operator_page_shows_the_decision_and_heatmap_offline(run, predictor, tmp_path):
    """The page in headless Chromium (Playwright, the system's browser): an image picked, its decision, score
    and threshold shown as the API gives them, the heatmap drawn over it at its size, one row of history;
    every request the page makes goes to this server (nothing external)."""
    import shutil

    sync_api = pytest.importorskip("playwright.sync_api")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("no Chromium on this machine")
    image = _test_images(run[0])[-1]
    with serving(predictor) as base:
        expected = predict(base, [(image.name, image.read_bytes())])[2]["results"][0]
        requests: list[str] = []
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(base + "/")
            page.set_input_files("#pick", str(image))
            page.wait_for_selector(".result .decision", timeout=30000)
            page.wait_for_function("document.querySelector('canvas.heatmap').width > 0", timeout=30000)
            shown = page.inner_text(".result")
            heat = page.evaluate("""() => { const c = document.querySelector('canvas.heatmap');
                const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
                let lit = 0; for (let i = 0; i < d.length; i += 4) lit += d[i] > 0;
                const img = document.querySelector('.view img');
                return [c.width, c.height, lit, img.naturalWidth, img.naturalHeight]; }""")
            history = page.locator("#history tr").count()
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            browser.close()
    assert page_decision(shown) == expected["decision"]
    assert f"{expected['pred_score']:.3f}" in shown and f"{expected['score']:.5g}"[:5] in shown
    width, height, lit, natural_w, natural_h = heat
    assert (width, height) == (natural_w, natural_h) == Image.open(image).size and lit > 0
    assert history == 1 and (tmp_path / "page.png").stat().st_size > 0
    assert requests and all(url.startswith(base) or url.startswith(("blob:", "data:")) for url in requests)


def page_decision(text: str) -> str:
    return text.strip().splitlines()[0].strip()


def test_an_exported_folder_serves_the_same_answers_as_its_run(run, predictor, tmp_path):
    """The export (ONNX, ddad_infer in the server's process) against the run in PyTorch: scores, labels,
    thresholds and categories, given and recognised."""
    from ddad.serving.predictor import Predictor

    pytest.importorskip("onnxruntime")
    root, run_dir = run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export"), "--quiet"]) == 0
    exported = Predictor(tmp_path / "export")
    assert exported.exported and exported.key == predictor.key and exported.info["method"] == "patchcore"
    files = _test_images(root)
    answers = []
    for model in (predictor, exported):
        with serving(model) as base:
            answers.append([predict(base, [(p.name, p.read_bytes())], category=c)[2]["results"][0]
                            for p in files for c in (p.parents[2].name, None)])
    for a, b in zip(*answers):
        assert b["score"] == pytest.approx(a["score"], rel=1e-4)
        assert (b["pred_label"], b["threshold"], b["threshold_source"], b["category"]) == \
               (a["pred_label"], a["threshold"], a["threshold_source"], a["category"])


def test_a_timeout_or_a_client_gone_leaves_the_others_answered(run, predictor):
    """Requests held past their timeout are answered 504 (the one in inference, and the one waiting behind it,
    whose image is then not run); a client that disconnects while its image waits does not disturb the next
    request, which is answered as usual once the model is free."""
    import socket

    data = _test_images(run[0])[0].read_bytes()
    gated = Gated(predictor)
    with serving(gated, timeout_s=1.0, max_wait_ms=0) as base:
        held: list = []
        first = threading.Thread(target=lambda: held.append(predict(base, [("a.png", data)])))
        first.start()
        assert gated.entered.wait(30)  # in inference, held at the gate
        status, _, body = predict(base, [("late.png", data)])  # waits in the queue behind it, then gives up
        assert status == 504 and body["kind"] == "timeout"
        body_bytes, head = multipart([("gone.png", data)])
        port = int(base.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port)) as s:  # a client that leaves without its answer
            s.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: {head['Content-Type']}\r\n"
                      f"Content-Length: {len(body_bytes)}\r\n\r\n".encode() + body_bytes)
        gated.gate.set()
        first.join(60)
        after = predict(base, [("b.png", data)])
        metrics = call(f"{base}/metrics")[2]
    assert held[0][0] == 504 and after[0] == 200 and after[2]["results"][0]["name"] == "b.png"
    assert 'ddad_errors_total{kind="timeout"} 2.0' in metrics
    assert "ddad_batch_size_sum 3.0" in metrics  # a.png, the gone client's image, b.png: late.png was not run
