"""``ddad serve``: an inspection service for the line (FastAPI + uvicorn).

    predictor   a run (PyTorch, its stored decisions) or an exported folder (ddad_infer), behind one call:
                images -> decided results, as ``ddad predict`` decides them
    batcher     micro-batching: concurrent requests grouped up to the batch size within a short wait, one
                inference at a time, a bounded queue (503 with Retry-After when full), a timeout per request
    app         the HTTP API (/v1/predict, /v1/model, /healthz, /readyz, /metrics) and the operator page
"""
