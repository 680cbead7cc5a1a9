"""Is the server's memory growth a leak? Python-level memory under load: tracemalloc's traced size after each
pass of REQUESTS requests from 16 clients, with the process's RSS, the server in this process (uvicorn in a
thread, the real app and predictor), and the allocation sites that grew most from the second pass to the last.

    python benchmarks/serve_memory.py RUN_OR_EXPORT IMAGES_DIR [--passes 8] [--requests 200] --out F.json
"""
import argparse, gc, json, socket, threading, time, tracemalloc, urllib.request, uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
import uvicorn

from ddad.serving.app import create_app, ServeConfig
from ddad.serving.predictor import Predictor

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("model", type=Path)
ap.add_argument("images", type=Path)
ap.add_argument("--passes", type=int, default=8)
ap.add_argument("--requests", type=int, default=200)
ap.add_argument("--out", type=Path, required=True)
args = ap.parse_args()
datas = [p.read_bytes() for p in sorted(args.images.iterdir()) if p.is_file()]
app = create_app(Predictor(args.model), ServeConfig(max_queue=1024))
s = socket.socket(); s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]; s.close()
server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
base = f"http://127.0.0.1:{port}"
while True:
    try:
        if urllib.request.urlopen(base + "/readyz").status == 200: break
    except Exception: time.sleep(0.5)

def post(i):
    b = uuid.uuid4().hex
    body = (f'--{b}\r\nContent-Disposition: form-data; name="image"; filename="{i}.jpg"\r\n\r\n'.encode()
            + datas[i % len(datas)] + f"\r\n--{b}--\r\n".encode())
    r = urllib.request.Request(base + "/v1/predict", body, {"Content-Type": f"multipart/form-data; boundary={b}"})
    with urllib.request.urlopen(r, timeout=600) as resp: return resp.status

tracemalloc.start(25)
snaps, rows = [], []
for p in range(args.passes):
    with ThreadPoolExecutor(16) as ex: codes = list(ex.map(post, range(args.requests)))
    gc.collect()
    cur, peak = tracemalloc.get_traced_memory()
    rss = [int(l.split()[1]) / 1024 for l in open("/proc/self/status") if l.startswith("VmRSS")][0]
    rows.append({"pass": p, "ok": codes.count(200), "python_mb": round(cur / 2**20, 2), "rss_mb": round(rss)})
    print(json.dumps(rows[-1]), flush=True)
    snaps.append(tracemalloc.take_snapshot())
grown = [str(stat) for stat in snaps[-1].compare_to(snaps[min(1, len(snaps) - 1)], "lineno")[:8]]
print("\n".join(grown))
args.out.parent.mkdir(parents=True, exist_ok=True)
args.out.write_text(json.dumps({"model": str(args.model), "date": time.strftime("%Y-%m-%d %H:%M"), "passes": rows,
                                "grown_most": grown}, indent=2))
server.should_exit = True
