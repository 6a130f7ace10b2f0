"""The server's app as a Ray Serve deployment: many replicas behind one endpoint, on one machine
or a cluster, autoscaled on ongoing requests.

    serve run fastdiff/serve/ray_serve.yaml        # from the repository root (README: "Serving")

Each replica is one `fastdiff.serve.app` (model, Batcher, metrics) in its own process; batching
stays the server's own (Ray Serve's @serve.batch is not used: one batching layer, not two). Ray's
proxy routes each request to a replica with few ongoing requests; `max_ongoing_requests` per
replica should cover a batch plus the requests waiting to join it, and `max_queued_requests`
bounds what Ray holds beyond that (503 past it).
"""

from __future__ import annotations

from fastdiff.serve.app import Settings, create_app


def deployment(settings: Settings, **options):
    """A Ray Serve deployment whose replicas each serve `create_app(settings)`, the model loaded
    and warmed while the replica starts (so Ray routes to it only when ready). `options`: Ray
    Serve's deployment options (num_replicas, ray_actor_options, autoscaling_config, ...)."""
    from ray import serve

    def build_app():
        return create_app(settings, load_now=True)

    return serve.deployment(serve.ingress(build_app)(), name="fastdiff", **options)


def build(args: dict):
    """The application builder the config file names: `args` are `Settings` fields; replicas,
    GPUs and autoscaling come from the file's `deployments` section."""
    return deployment(Settings.from_dict(dict(args or {}))).bind()
