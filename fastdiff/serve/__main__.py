"""python -m fastdiff.serve --model tiny-shapes --backend torch --port 8000"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv=None) -> int:
    from fastdiff.serve.app import Settings

    d = Settings()
    p = argparse.ArgumentParser(prog="python -m fastdiff.serve", description="Serve one model over HTTP, batched.")
    p.add_argument("--model", default=None, help="a name or folder (default: $FASTDIFF_MODEL, else the embedded model)")
    p.add_argument("--backend", default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None, choices=("float32", "bfloat16", "float16"))
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FASTDIFF_API_KEY"),
                   help="require this key in X-API-Key (default $FASTDIFF_API_KEY); needed beyond loopback")
    p.add_argument("--no-api-key", action="store_true", help="bind beyond loopback without a key (not recommended)")
    p.add_argument("--max-batch-images", type=int, default=d.max_batch_images, help="rows per denoising loop; 1: no batching")
    p.add_argument("--max-queue", type=int, default=d.max_queue)
    p.add_argument("--max-wait-ms", type=float, default=d.max_wait_ms)
    p.add_argument("--max-pixels", type=int, default=d.max_pixels)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--max-images-per-request", type=int, default=d.max_images_per_request)
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    args = p.parse_args(argv)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("fastdiff").setLevel(logging.INFO)
    if not is_loopback(args.host) and not args.api_key and not args.no_api_key:
        print(f"error: --host {args.host} is beyond loopback: set --api-key (or $FASTDIFF_API_KEY), "
              "or pass --no-api-key to serve without one", file=sys.stderr)  # fmt: skip
        return 2
    try:
        import uvicorn

        from fastdiff.serve.app import create_app
    except ImportError as e:
        print(f"error: fastdiff.serve needs the serve extra ({e.name} is missing): pip install -c constraints.txt -e '.[serve]'", file=sys.stderr)
        return 2
    settings = Settings(
        model=args.model, backend=args.backend, device=args.device, dtype=args.dtype, api_key=args.api_key,
        max_batch_images=args.max_batch_images, max_queue=args.max_queue, max_wait_ms=args.max_wait_ms,
        max_pixels=args.max_pixels, max_steps=args.max_steps, max_images_per_request=args.max_images_per_request,
        timeout_s=args.timeout_s,
    )  # fmt: skip
    uvicorn.run(create_app(settings), host=args.host, port=args.port, log_level="info")
    return 0


if __name__ == "__main__":
    sys.exit(main())
