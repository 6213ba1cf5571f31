"""Ray Serve: the A1111 generate routes and the job API in front of N Studio replicas
(``danqing ray-serve``, docs/scale.md).

Two deployments make one Serve application:

- ``Ingress`` (no CPU reserved): a FastAPI app with ``/sdapi/v1/txt2img`` and ``/img2img``, the
  option and listing routes, and ``danqing serve``'s job routes (``/api/v1/jobs``, history),
  whose jobs a ``Dispatcher`` (``dispatch.py``) sends to the replicas. It checks a request
  exactly as ``danqing serve`` does -- the same body models, the same ``request_fields`` and
  ``ServerState.prepare_request`` (names resolved in their folders, uploads bounded, the work
  limits), the same error handlers and middleware -- so the same requests are accepted, and
  refused with the same 4xx answers.
- ``StudioReplica`` (``--replicas N``, one CPU or GPU each): one Studio per replica, one request
  at a time (``max_ongoing_requests=1``). Requests carry their checkpoint as Ray Serve's
  multiplexed model id, so Ray routes a request to a replica that has its model loaded when
  one is free.

A replica that dies while it runs a request (its process killed, its node lost) is replaced by
Ray; the ingress sends the request once more, to another replica. The job store (SQLite or
PostgreSQL, ``--db`` / ``--db-url``) keeps the jobs, the history and the server options, as it
does for ``danqing serve``.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Response
from ray import serve

from danqing.errors import InvalidRequest
from danqing.outputs import place
from danqing.request import GenerationRequest
from danqing.scale.dispatch import Dispatcher
from danqing.scale.replica import generate_result, make_studio
from danqing.server.a1111 import (
    Img2ImgBody,
    Txt2ImgBody,
    a1111_error,
    a1111_answer,
    decoded_inputs,
    listing_routes,
    option_routes,
    request_fields,
    script_key,
)
from danqing.server.app import add_api_fallback, add_cors, add_error_handlers, add_guards, job_router
from danqing.server.common import job_error
from danqing.server.security import ERROR_RESPONSES, JOB_RESPONSES, guard_body
from danqing.server.state import ServerState
from danqing.server.store import JobStore
from danqing.settings import ServerSettings, Settings, force_offline

APP_NAME = "danqing"
REPLICA = "StudioReplica"
RETRIES = 1  # a request whose replica died is sent once more


@dataclass(frozen=True)
class RayServeOptions:
    """How the replicas are laid out.

    Attributes:
        replicas: replicas started (the autoscaling minimum when ``max_replicas`` is larger).
        max_replicas: autoscaling maximum (None = a fixed ``replicas``).
        threads: torch CPU threads per replica (None = torch's choice).
        replica_cpus, replica_gpus: what Ray reserves for each replica; ``replica_gpus=1``
            gives each replica its own GPU.
    """

    replicas: int = 1
    max_replicas: int | None = None
    threads: int | None = 1
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0


class StudioReplica:
    """A Ray Serve replica: one Studio, one request at a time, the model of the last request
    kept loaded (``serve.multiplexed`` tells the router which one)."""

    def __init__(self, settings: Settings, threads: int | None):
        self.settings = settings
        self.studio = make_studio(settings, threads)
        self.model_loads = 0  # how often this replica loaded a checkpoint

    @serve.multiplexed(max_num_models_per_replica=1)
    async def model(self, name: str):
        self.model_loads += 1
        return await asyncio.to_thread(self.studio.models.load, name)

    async def generate(self, request: GenerationRequest, save: bool) -> dict:
        try:
            await self.model(serve.get_multiplexed_model_id())
        except Exception as exc:  # noqa: BLE001 -- answered as the server's worker would
            return {"error": str(exc)}
        out = await asyncio.to_thread(generate_result, self.studio, request, save=save,
                                      outputs_dir=place.pictures_root(self.settings))
        return {**out, "model_loads": self.model_loads}

    async def generate_steps(self, request: GenerationRequest, save: bool):
        """``generate`` as a stream: ``{"step": [batch_index, step, total, batch_count]}`` for each
        step as it is taken, then the answer (the job API's progress)."""
        try:
            await self.model(serve.get_multiplexed_model_id())
        except Exception as exc:  # noqa: BLE001 -- answered as the server's worker would
            yield {"error": str(exc)}
            return
        loop, steps = asyncio.get_running_loop(), asyncio.Queue()

        def on_step(info) -> None:  # in the generating thread
            loop.call_soon_threadsafe(steps.put_nowait, [info.batch_index, info.step, info.total, info.batch_count])

        run = asyncio.ensure_future(asyncio.to_thread(generate_result, self.studio, request, save=save,
                                                      outputs_dir=place.pictures_root(self.settings), on_step=on_step))
        while not run.done():
            step = asyncio.ensure_future(steps.get())
            await asyncio.wait({run, step}, return_when=asyncio.FIRST_COMPLETED)
            if step.done():
                yield {"step": step.result()}
            else:
                step.cancel()
        while not steps.empty():  # the last steps, put before the run ended
            yield {"step": steps.get_nowait()}
        yield {**run.result(), "model_loads": self.model_loads}


def build_application(settings: Settings, server: ServerSettings, options: RayServeOptions):
    """The Serve application: the ingress bound to the replicas (``serve.run`` starts it)."""
    scaling: dict[str, Any] = {"num_replicas": options.replicas}
    if options.max_replicas and options.max_replicas > options.replicas:
        scaling = {"autoscaling_config": {"min_replicas": options.replicas, "max_replicas": options.max_replicas,
                                          "target_ongoing_requests": 1}}
    replica = serve.deployment(StudioReplica, name=REPLICA, max_ongoing_requests=1,
                               ray_actor_options={"num_cpus": options.replica_cpus, "num_gpus": options.replica_gpus},
                               **scaling)

    slots = max(options.replicas, options.max_replicas or 0)  # one job per replica at a time

    def build():  # runs in the ingress's process
        return ingress_app(settings, server, slots=slots)

    ingress = serve.deployment(serve.ingress(build)(), name="Ingress", max_ongoing_requests=256,
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(replica.bind(settings, options.threads))


def start(settings: Settings, server: ServerSettings, options: RayServeOptions, *, address: str | None = None,
          num_cpus: int | None = None) -> None:
    """Connect to (``address``) or start a local Ray, then run the application on
    ``server.host:server.port``; returns once every replica is ready."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": server.host, "port": server.port})
    serve.run(build_application(settings, server, options), name=APP_NAME, route_prefix="/")


def ingress_worker_name() -> str:
    """The ingress's name in the job store (``Job.worker``, what ``recover`` goes by):
    ``DANQING_WORKER``, else one name for the Ray cluster -- not the host's, since Ray may start
    a new ingress on another node, and it must recover the jobs of the one before."""
    import ray

    return os.environ.get("DANQING_WORKER") or f"ray-serve@{ray.get_runtime_context().gcs_address}"


def ingress_app(settings: Settings, server: ServerSettings, *, slots: int = 1) -> FastAPI:
    """The ingress's FastAPI app (built in the ingress replica). Its lifespan recovers the jobs
    a previous ingress left and starts the dispatcher (``slots`` jobs in flight at most)."""
    force_offline()
    studio = make_studio(settings, 1)  # names only: the ingress's Studio never generates and loads no model
    store = JobStore(settings.db_url or settings.db_path, worker=ingress_worker_name())
    dispatcher = Dispatcher(store, studio, slots=slots, send=stream_replica)
    state = ServerState(settings=settings, server=server, store=store, worker=dispatcher)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.recovered = dispatcher.start()
        try:
            yield
        finally:
            dispatcher.stop()

    app = FastAPI(title="danqing (Ray Serve)", version="0.1.0", lifespan=lifespan,
                  description="丹青 danqing: the A1111 generate routes and the job API over Ray Serve replicas "
                              "(docs/scale.md)")
    app.state.danqing = state  # guard_body reads the limits from here
    add_error_handlers(app)
    router = APIRouter(prefix="/sdapi/v1", tags=["A1111 compatible"])
    _generate_routes(router, state)
    option_routes(router, state)
    listing_routes(router, state)
    guard = [Depends(guard_body)]
    app.include_router(router, dependencies=guard, responses=ERROR_RESPONSES)
    app.include_router(job_router(state), dependencies=guard, responses=ERROR_RESPONSES)  # with /api/v1/health
    add_api_fallback(app)
    add_cors(app, server)
    add_guards(app, server)
    return app


def call_replica(request: GenerationRequest, save: bool, timeout_s: float) -> dict:
    """Send one request to a replica that has its model loaded (when one is free); once more
    to another replica if that one dies meanwhile."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    handle = serve.get_deployment_handle(REPLICA, app_name=APP_NAME)
    for attempt in range(RETRIES + 1):
        try:
            out = handle.options(multiplexed_model_id=request.model).generate.remote(request, save).result(
                timeout_s=timeout_s)
            return {**out, "attempts": attempt + 1}
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            if attempt == RETRIES:
                return {"error": "internal error: the replica running this request died, and so did the one "
                                 "it was sent to again"}
    raise AssertionError("unreachable")


def stream_replica(request: GenerationRequest, save: bool, on_step) -> dict:
    """``call_replica`` for a job: the replica streams each step (``on_step(batch_index, step,
    total, batch_count)``) before its answer; sent once more, to another replica, if its
    replica dies (the steps then start again)."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

    handle = serve.get_deployment_handle(REPLICA, app_name=APP_NAME)
    for attempt in range(RETRIES + 1):
        try:
            out: dict = {"error": "internal error: the replica gave no answer"}
            for item in handle.options(multiplexed_model_id=request.model, stream=True).generate_steps.remote(
                    request, save):
                if "step" in item:
                    on_step(*item["step"])
                else:
                    out = item
            return {**out, "attempts": attempt + 1}
        except (ActorDiedError, ActorUnavailableError, RayActorError):
            if attempt == RETRIES:
                return {"error": "internal error: the replica running this job died, and so did the one "
                                 "it was sent to again"}
    raise AssertionError("unreachable")


def _generate_routes(r: APIRouter, state: ServerState) -> None:
    """txt2img and img2img: the checks of ``danqing serve``'s routes, then a replica runs it."""

    def run(body, img2img: bool, response: Response) -> dict:
        fields = request_fields(body, img2img=img2img)
        if script_key(body.script_name) is not None:
            raise InvalidRequest("script_name", "scripts (X/Y/Z plot, prompts from file) run on `danqing serve`, "
                                                "not on the Ray deployment; leave it unset")
        if body.script_args:
            raise InvalidRequest("script_args", "given without a script_name; leave it unset or []")
        fields, init, mask = decoded_inputs(body, fields, img2img, state)
        try:
            request = state.prepare_request(fields, init_image=init, mask=mask, overrides=body.override_settings or None)
        except InvalidRequest as exc:
            raise a1111_error(exc) from None
        job = SimpleNamespace(id=uuid.uuid4().hex, created=time.time(), status="done", error=None, result=None)
        out = call_replica(request, body.save_images and not body.do_not_save_samples, state.server.sync_timeout_s)
        if "error" in out:
            job.status, job.error = "failed", out["error"]
            raise job_error(job)
        pngs = out.pop("pngs")
        response.headers["x-danqing-worker"] = out.get("worker", "")
        response.headers["x-danqing-model-loads"] = str(out.get("model_loads", ""))
        response.headers["x-danqing-attempts"] = str(out.pop("attempts", 1))
        job.result = out
        return a1111_answer(state, body, job, pngs, img2img)

    @r.post("/txt2img", summary="txt2img (A1111 fields), run by a replica", responses=JOB_RESPONSES)
    def txt2img(body: Txt2ImgBody, response: Response) -> dict:
        return run(body, False, response)

    @r.post("/img2img", summary="img2img and inpaint (A1111 fields), run by a replica", responses=JOB_RESPONSES)
    def img2img(body: Img2ImgBody, response: Response) -> dict:
        return run(body, True, response)


__all__ = ["RayServeOptions", "StudioReplica", "build_application", "call_replica", "ingress_app", "start",
           "stream_replica"]
