"""Load on ``ddad serve`` over loopback, bounded: for each number of concurrent clients, REQUESTS requests in
all (one image each, from IMAGES in turn), every answer checked to be the one asked for (none lost or
duplicated); throughput, latency percentiles, the batch sizes the server reached (its /metrics), its RSS
before and after, and the errors.

    python benchmarks/serve_load.py RUN_OR_EXPORT IMAGES_DIR [--clients 1 4 16] [--requests 200]
        [--max-wait-ms 10] --out F.json
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import date
from pathlib import Path


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def post(base: str, name: str, data: bytes) -> tuple[int, dict]:
    boundary = uuid.uuid4().hex
    body = (f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{name}"\r\n\r\n'.encode()
            + data + f"\r\n--{boundary}--\r\n".encode())
    request = urllib.request.Request(f"{base}/v1/predict", body,
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, {}


def batches(base: str) -> tuple[float, float]:
    text = urllib.request.urlopen(f"{base}/metrics", timeout=30).read().decode()
    value = lambda key: float(next(l.split()[-1] for l in text.splitlines() if l.startswith(key)))  # noqa: E731,E741
    return value("ddad_batch_size_count"), value("ddad_batch_size_sum")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("images", type=Path)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(args.images.rglob("*")) if p.suffix.lower() in (".png", ".jpg")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "ddad", "serve", str(args.model), "--port", str(port), "--quiet",
                               "--max-wait-ms", str(args.max_wait_ms), "--max-queue", "1024"])
    base = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{base}/readyz", timeout=5).status == 200:
                    break
            except OSError:
                time.sleep(0.5)
        rows = []
        for clients in args.clients:
            before_rss, (n0, s0) = rss_mb(server.pid), batches(base)
            latencies: list[float] = []
            answers: dict[str, int] = {}
            errors: list[int] = []
            lock = threading.Lock()
            todo = iter(range(args.requests))

            def client() -> None:
                while True:
                    with lock:
                        i = next(todo, None)
                    if i is None:
                        return
                    name = f"req-{clients}-{i}.png"
                    start = time.perf_counter()
                    status, body = post(base, name, images[i % len(images)])
                    with lock:
                        latencies.append(time.perf_counter() - start)
                        if status != 200:
                            errors.append(status)
                        for r in body.get("results", []):
                            answers[r["name"]] = answers.get(r["name"], 0) + 1

            start = time.perf_counter()
            threads = [threading.Thread(target=client) for _ in range(clients)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - start
            n1, s1 = batches(base)
            latencies.sort()
            pct = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
            rows.append({"clients": clients, "requests": args.requests, "seconds": seconds,
                         "throughput_per_s": args.requests / seconds, "p50_s": pct(0.5), "p95_s": pct(0.95),
                         "p99_s": pct(0.99), "mean_batch": (s1 - s0) / max(n1 - n0, 1), "errors": errors,
                         "lost": args.requests - len(answers), "duplicated": sum(c - 1 for c in answers.values()),
                         "rss_mb_before": before_rss, "rss_mb_after": rss_mb(server.pid)})
            print(json.dumps(rows[-1]), flush=True)
    finally:
        server.terminate()
        server.wait(60)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "date": date.today().isoformat(),
                                    "model": str(args.model), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
