"""What the three shells (A1111 routes, job API, web UI) share: the store, the worker, the
registry, the server options, and ``prepare_request`` -- the one place a request from the
network becomes a GenerationRequest ready for the queue.

Every model a request names goes through ``danqing.models.names`` (names of the listing only,
one message per field whether or not a file exists elsewhere); the worker's Studio runs with its
registry in names-only mode, so the library's own lookups are held to the same rule. Uploaded
pictures are stored under ``inputs_dir`` only once every check has passed, and removed again if
the job cannot be queued."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from danqing.customise.lora import request_tags
from danqing.editing.hires import hires_upscalers
from danqing.errors import InvalidRequest
from danqing.models.names import Named, inside, resolve
from danqing.outputs.store import atomic_save_image
from danqing.request import GenerationRequest
from danqing.models.preview_decoder import PREVIEW_MODES
from danqing.server.jobs import Worker, resolve_for_queue
from danqing.server.store import Job, JobStore
from danqing.server.security import UploadLimits, check_work
from danqing.settings import ServerSettings, Settings

# Server options (A1111 /sdapi/v1/options names) -> default; stored in the database.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # None = settings.default_model
    "sd_vae": "Automatic",  # "Automatic" / "None" = the checkpoint's own VAE
    "CLIP_stop_at_last_layers": 1,
    "show_progress_type": PREVIEW_MODES[0],  # live previews: "Approx cheap" or "TAESD"
}
VAE_NONE = ("Automatic", "None", "", None)


@dataclass
class ServerState:
    settings: Settings
    server: ServerSettings
    store: JobStore
    worker: Worker
    train: Any = None  # the training jobs (server/train.py: TrainQueue)

    @property
    def registry(self):
        return self.worker.studio.registry

    @property
    def limits(self) -> UploadLimits:
        return UploadLimits(self.server.max_upload_bytes, self.server.max_upload_pixels)

    @property
    def inputs_dir(self) -> Path:
        """Uploaded init images and masks (A1111's ``outputs/init-images``)."""
        return self.settings.outputs_dir / "init-images"

    # -- names --------------------------------------------------------------------------------
    def model_name(self, kind: str, value: object, field: str) -> str:
        """A client's model name -> the registry's name of a model installed in its folder."""
        return self.registry.resolve(kind, value, field).name

    def upscaler_name(self, value: object, field: str = "hr_upscaler") -> str:
        """A hires-fix upscaler: a latent mode, a built-in or an installed model, by name."""
        names = hires_upscalers(self.worker.studio.upscalers)
        return resolve(value, [Named(n) for n in names], field=field, what="upscaler", folder="upscalers").name

    def face_model_name(self, value: object) -> str:
        """A face-restoration model by name; None = the first one installed."""
        upscalers = self.worker.studio.upscalers
        if value is None:
            return upscalers.face_model_name(None)  # refuses when none is installed
        return resolve(value, [Named(n) for n in upscalers.face_names()], field="face_restoration_model",
                       what="face-restoration model", folder="face_restore").name

    # -- options ------------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        values = {**OPTION_DEFAULTS, **{k: v for k, v in self.store.options().items() if k in OPTION_DEFAULTS}}
        if values["sd_model_checkpoint"] is None:
            values["sd_model_checkpoint"] = self.settings.default_model
        return values

    def check_options(self, values: dict[str, Any]) -> dict[str, Any]:
        """Validate option values (names resolved); raises InvalidRequest naming the key."""
        out = {}
        for key, value in values.items():
            if key == "sd_model_checkpoint":
                out[key] = self.model_name("checkpoint", value, key)
            elif key == "sd_vae":
                out[key] = "Automatic" if value in VAE_NONE else self.model_name("vae", value, key)
            elif key == "CLIP_stop_at_last_layers":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
                    raise InvalidRequest(key, f"must be an integer between 1 and 12, got {value!r}")
                out[key] = value
            elif key == "show_progress_type":
                if value not in PREVIEW_MODES:
                    raise InvalidRequest(key, f"must be one of {', '.join(PREVIEW_MODES)}, got {value!r}")
                out[key] = value
            else:
                raise InvalidRequest(key, f"unknown or read-only option; settable: {', '.join(OPTION_DEFAULTS)}")
        return out

    def set_options(self, values: dict[str, Any]) -> dict[str, Any]:
        checked = self.check_options(values)
        self.store.set_options(checked)
        return self.options()

    # -- pictures -----------------------------------------------------------------------------
    def save_upload(self, image, kind: str) -> str:
        """An uploaded picture, written atomically under ``inputs_dir``; returns its path."""
        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        path = self.inputs_dir / date.today().isoformat() / f"{uuid.uuid4().hex}-{kind}.png"
        return str(atomic_save_image(image, path))

    def _inside_inputs(self, value: object, field: str) -> str:
        """Paths in a request may only name files the server itself stored under ``inputs_dir``."""
        p = Path(value) if isinstance(value, str) and value and "\0" not in value else None
        if p is None or not inside(p, self.inputs_dir) or not p.resolve().is_file():
            raise InvalidRequest(field, "paths are not accepted over HTTP; send the picture itself (base64), "
                                        "or a path returned by this server under its init-images folder")
        return str(p.resolve())

    def _picture(self, value: object, field: str, kind: str):
        """A picture of the request: a decoded upload (a PIL image, stored only once the request
        is accepted) or a path this server returned."""
        if hasattr(value, "getbands"):
            return Upload(value, kind)
        if isinstance(value, ClipUpload):  # a video job's control clip, kept by its route
            return value
        return self._inside_inputs(value, field)

    def control_units(self, units) -> list[dict]:
        """ControlNet units of a request: each model a name of ``models/controlnet/``, each
        image a decoded upload (stored once the request is accepted) or a path this server
        returned (never another path)."""
        if not isinstance(units, (list, tuple)):
            raise InvalidRequest("controlnet", "must be a list of unit objects")
        out = []
        for i, unit in enumerate(units):
            if not isinstance(unit, dict):
                raise InvalidRequest(f"controlnet.{i}", "must be a unit object with a ControlNet model name")
            out.append({**unit, "model": self.model_name("controlnet", unit.get("model"), f"controlnet.{i}.model"),
                        "image": self._picture(unit.get("image"), f"controlnet.{i}.image", "control")})
        return out

    # -- requests -----------------------------------------------------------------------------
    def prepare_request(self, fields: dict[str, Any], *, init_image=None, mask=None,
                        overrides: dict[str, Any] | None = None) -> GenerationRequest:
        """Network fields (GenerationRequest names) + uploaded pictures -> a queued-ready request.

        Args:
            fields: GenerationRequest fields; every model is a name of its models folder
                (``danqing.models.names``). Pictures (``ip_adapter_image`` items, ControlNet
                units' ``image``) are decoded uploads (PIL images) or paths this server returned.
            init_image, mask: decoded PIL pictures.
            overrides: A1111 ``override_settings`` (validated as options, applied to this request only).

        Uploads are stored under ``inputs_dir`` only after every check has passed.
        """
        return self._prepare(fields, init_image, mask, overrides)[0]

    def submit(self, fields: dict[str, Any], *, source: str, save: bool, init_image=None, mask=None,
               overrides: dict[str, Any] | None = None) -> Job:
        """``prepare_request`` and add the job to the queue; its uploads are removed if that fails."""
        request, stored = self._prepare(fields, init_image, mask, overrides)
        try:
            return self.worker.submit(request, source=source, save=save)
        except BaseException:
            _remove(stored)
            raise

    def _prepare(self, fields, init_image, mask, overrides) -> tuple[GenerationRequest, list[str]]:
        """(the request, the uploads it stored)."""
        fields = dict(fields)
        opts = self.options()
        if overrides:
            opts.update(self.check_options(overrides))
        # 1. names, and pictures given by path: all checked before anything is stored
        for name in ("init_image", "mask"):
            if fields.get(name) is not None:
                fields[name] = self._inside_inputs(fields[name], name)
        if init_image is not None:
            fields["init_image"] = Upload(init_image, "init")
        if mask is not None:
            if fields.get("init_image") is None:
                raise InvalidRequest("mask", "a mask needs an init image to inpaint")
            fields["mask"] = Upload(mask, "mask")
        if fields.get("ip_adapter_image"):
            images = fields["ip_adapter_image"]
            if not isinstance(images, (list, tuple)):
                raise InvalidRequest("ip_adapter_image", "must be a list of pictures (paths returned by this server)")
            fields["ip_adapter_image"] = tuple(self._picture(p, "ip_adapter_image", "ipadapter") for p in images)
        for name, kind in (("ip_adapter", "ipadapter"), ("ip_adapter_encoder", "clip_vision")):
            if fields.get(name) is not None:
                fields[name] = self.model_name(kind, fields[name], name)
        if fields.get("controlnet"):
            fields["controlnet"] = self.control_units(fields["controlnet"])
        regions = fields.get("regions")
        if isinstance(regions, dict) and isinstance(regions.get("masks"), (list, tuple)):  # paths this server returned
            fields["regions"] = {**regions, "masks": tuple(self._inside_inputs(p, f"regions.masks.{i}")
                                                          for i, p in enumerate(regions["masks"]))}
        if fields.get("model") is not None:
            fields["model"] = self.model_name("checkpoint", fields["model"], "model")
        else:
            fields["model"] = opts["sd_model_checkpoint"]
        if fields.get("vae") is not None:
            fields["vae"] = None if fields["vae"] in VAE_NONE else self.model_name("vae", fields["vae"], "vae")
        elif opts["sd_vae"] not in VAE_NONE:
            fields["vae"] = opts["sd_vae"]
        if fields.get("refiner_checkpoint") is not None:
            fields["refiner_checkpoint"] = self.model_name("checkpoint", fields["refiner_checkpoint"], "refiner_checkpoint")
        if "clip_skip" not in fields or (overrides and "CLIP_stop_at_last_layers" in overrides):
            fields["clip_skip"] = opts["CLIP_stop_at_last_layers"]
        # 2. the request itself, validated with stand-ins for the pictures not stored yet
        checked = GenerationRequest.create(**with_stand_ins(fields))
        for tag in request_tags(checked):  # <lora:...> tags: names of models/lora, as every other name
            self.model_name("lora", tag.name, "prompt")
        if checked.enable_hr:
            self.upscaler_name(checked.hr_upscaler)
        if checked.restore_faces:  # a face model must be installed (the first one, unless named)
            fields["face_restoration_model"] = self.face_model_name(checked.face_restoration_model)
        check_work(checked, self.server)  # the server's work limits (docs/security.md)
        # 3. accepted: the uploads are stored, and the request names them
        stored: list[str] = []
        try:
            for name in ("init_image", "mask"):
                if name in fields:
                    fields[name] = self._store(fields[name], stored)
            if fields.get("ip_adapter_image"):
                fields["ip_adapter_image"] = tuple(self._store(p, stored) for p in fields["ip_adapter_image"])
            if fields.get("controlnet"):
                fields["controlnet"] = [{**u, "image": self._store(u["image"], stored)} for u in fields["controlnet"]]
            request = resolve_for_queue(GenerationRequest.create(**fields), self.settings.default_model)
        except BaseException:
            _remove(stored)
            raise
        return request, stored

    def _store(self, value, stored: list[str]):
        if isinstance(value, Upload):
            value = self.save_upload(value.image, value.kind)
            stored.append(value)
        return value


@dataclass(frozen=True)
class Upload:
    """A decoded picture waiting to be stored (``ServerState._store``)."""

    image: Any
    kind: str


@dataclass(frozen=True)
class ClipUpload:
    """An uploaded clip (MP4, GIF or animated WebP bytes) waiting to be kept: a video job's
    ControlNet unit whose frames are the frames' maps (``server/video.py``)."""

    data: bytes
    kind: str = "control"


STAND_IN = "(upload)"


def with_stand_ins(fields: dict) -> dict:
    """The fields with a placeholder path for every picture or clip not stored yet (validation only)."""
    def stand_in(v):
        return STAND_IN if isinstance(v, (Upload, ClipUpload)) else v

    out = {k: stand_in(v) for k, v in fields.items()}
    if out.get("ip_adapter_image"):
        out["ip_adapter_image"] = tuple(stand_in(p) for p in out["ip_adapter_image"])
    if out.get("controlnet"):
        out["controlnet"] = [{**u, "image": stand_in(u["image"])} for u in out["controlnet"]]
    return out


def _remove(paths: list[str]) -> None:
    for p in paths:
        Path(p).unlink(missing_ok=True)
