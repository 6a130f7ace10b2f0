"""`python -m fastdiff.serve`: an HTTP service with dynamic batching (`app`, `batcher`), and the
same app as a Ray Serve deployment for several replicas (`ray_app`, `ray_serve.yaml`).

Needs the `serve` extra (FastAPI, uvicorn, prometheus_client); Ray Serve the `ray` extra.
"""
