"""What the three shells (A1111 routes, job API, web UI) share: the store, the worker, the
registry, the server options, and ``prepare_request`` -- the one place a request from the
network becomes a GenerationRequest ready for the queue."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

from danqing.errors import InvalidRequest
from danqing.request import GenerationRequest
from danqing.server.jobs import JobStore, Worker, resolve_for_queue
from danqing.server.security import UploadLimits, check_work, resolve_model
from danqing.settings import ServerSettings, Settings

# Server options (A1111 /sdapi/v1/options names) -> default; stored in the database.
OPTION_DEFAULTS: dict[str, Any] = {
    "sd_model_checkpoint": None,  # None = settings.default_model
    "sd_vae": "Automatic",  # "Automatic" / "None" = the checkpoint's own VAE
    "CLIP_stop_at_last_layers": 1,
}
VAE_NONE = ("Automatic", "None", "", None)


@dataclass
class ServerState:
    settings: Settings
    server: ServerSettings
    store: JobStore
    worker: Worker

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
                if not isinstance(value, str):
                    raise InvalidRequest(key, "must be a checkpoint name (see /sdapi/v1/sd-models)")
                out[key] = resolve_model(self.registry, "checkpoint", value, key)
            elif key == "sd_vae":
                if value in VAE_NONE:
                    out[key] = "Automatic"
                elif not isinstance(value, str):
                    raise InvalidRequest(key, "must be Automatic, None or a VAE name (see /sdapi/v1/sd-vae)")
                else:
                    out[key] = resolve_model(self.registry, "vae", value, key)
            elif key == "CLIP_stop_at_last_layers":
                if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
                    raise InvalidRequest(key, f"must be an integer between 1 and 12, got {value!r}")
                out[key] = value
            else:
                raise InvalidRequest(key, f"unknown or read-only option; settable: {', '.join(OPTION_DEFAULTS)}")
        return out

    def set_options(self, values: dict[str, Any]) -> dict[str, Any]:
        checked = self.check_options(values)
        self.store.set_options(checked)
        return self.options()

    # -- requests -----------------------------------------------------------------------------
    def save_upload(self, image, kind: str) -> str:
        """An uploaded picture, written atomically under ``inputs_dir``; returns its path."""
        import uuid

        from danqing.outputs.store import atomic_save_image

        if image.mode not in ("RGB", "RGBA", "L", "LA"):
            image = image.convert("RGBA" if "A" in image.getbands() or "transparency" in image.info else "RGB")
        path = self.inputs_dir / date.today().isoformat() / f"{uuid.uuid4().hex}-{kind}.png"
        return str(atomic_save_image(image, path))

    def _inside_inputs(self, value: str, field: str) -> str:
        """Paths in a request may only name files the server itself stored under ``inputs_dir``."""
        root = self.inputs_dir.resolve()
        try:
            p = Path(value).resolve()
        except (OSError, RuntimeError, ValueError):
            p = None
        if p is None or not p.is_relative_to(root) or not p.is_file():
            raise InvalidRequest(field, "paths are not accepted over HTTP; send the picture itself (base64), "
                                        "or a path returned by this server under its init-images folder")
        return str(p)

    def prepare_request(self, fields: dict[str, Any], *, init_image=None, mask=None,
                        overrides: dict[str, Any] | None = None) -> GenerationRequest:
        """Network fields (GenerationRequest names) + uploaded pictures -> a queued-ready request.

        Args:
            fields: GenerationRequest fields; ``model``/``vae`` must be names from the models folder.
            init_image, mask: decoded PIL pictures (stored under ``inputs_dir``).
            overrides: A1111 ``override_settings`` (validated as options, applied to this request only).
        """
        from danqing.customise.lora import request_tags
        from danqing.errors import ModelNotFound

        fields = dict(fields)
        opts = self.options()
        if overrides:
            opts.update(self.check_options(overrides))
        for name in ("init_image", "mask"):
            if fields.get(name) is not None:
                if not isinstance(fields[name], str):
                    raise InvalidRequest(name, "must be a path string returned by this server")
                fields[name] = self._inside_inputs(fields[name], name)
        for name in ("ip_adapter", "ip_adapter_encoder"):  # names in the models folder, never paths
            value = fields.get(name)
            if value is not None and (not isinstance(value, str) or "/" in value or "\\" in value or value.startswith(".")):
                raise InvalidRequest(name, "must be a name from the models folder (models/ipadapter, models/clip_vision), not a path")
        if fields.get("ip_adapter_image"):  # IP-Adapter pictures: files this server was given, as init_image
            images = fields["ip_adapter_image"]
            if not isinstance(images, (list, tuple)) or not all(isinstance(p, str) for p in images):
                raise InvalidRequest("ip_adapter_image", "must be a list of path strings returned by this server")
            fields["ip_adapter_image"] = tuple(self._inside_inputs(p, "ip_adapter_image") for p in images)
        if init_image is not None:
            fields["init_image"] = self.save_upload(init_image, "init")
        if mask is not None:
            if fields.get("init_image") is None:
                raise InvalidRequest("mask", "a mask needs an init image to inpaint")
            fields["mask"] = self.save_upload(mask, "mask")
        if fields.get("controlnet"):
            units = []
            for i, unit in enumerate(fields["controlnet"]):
                if not isinstance(unit, dict) or not isinstance(unit.get("model"), str):
                    raise InvalidRequest(f"controlnet.{i}", "must be a unit object with a ControlNet model name")
                unit = dict(unit)
                unit["model"] = resolve_model(self.registry, "controlnet", unit["model"], f"controlnet.{i}.model")
                unit["image"] = self._inside_inputs(str(unit.get("image")), f"controlnet.{i}.image")
                units.append(unit)
            fields["controlnet"] = units
        if fields.get("model") is not None:
            if not isinstance(fields["model"], str):
                raise InvalidRequest("model", "must be a checkpoint name (see /sdapi/v1/sd-models)")
            fields["model"] = resolve_model(self.registry, "checkpoint", fields["model"], "model")
        else:
            fields["model"] = opts["sd_model_checkpoint"]
        if fields.get("vae") is not None:
            if not isinstance(fields["vae"], str):
                raise InvalidRequest("vae", "must be a VAE name (see /sdapi/v1/sd-vae)")
            fields["vae"] = None if fields["vae"] in VAE_NONE else resolve_model(self.registry, "vae", fields["vae"], "vae")
        elif opts["sd_vae"] not in VAE_NONE:
            fields["vae"] = opts["sd_vae"]
        if "clip_skip" not in fields or (overrides and "CLIP_stop_at_last_layers" in overrides):
            fields["clip_skip"] = opts["CLIP_stop_at_last_layers"]
        request = GenerationRequest.create(**fields)
        # <lora:...> tags: their syntax and their files are checked here, so a bad tag is a 422
        # at submission and not a failed job (whether a LoRA fits the model is known at load).
        for tag in request_tags(request):
            try:
                self.registry.find("lora", tag.name)
            except ModelNotFound:
                names = ", ".join(e.name for e in self.registry.scan("lora")) or "none"
                raise InvalidRequest("prompt", f"LoRA {tag.name!r} not found; installed: {names}") from None
        if request.enable_hr:
            from danqing.editing.hires import check_hires_upscaler

            check_hires_upscaler(request.hr_upscaler, self.worker.studio.upscalers)
        if request.restore_faces:  # a face model must be installed (the first one, unless named)
            request = request.replace(face_restoration_model=self.worker.studio.upscalers.face_model_name(
                request.face_restoration_model))
        check_work(request, self.server)  # the server's work limits (docs/security.md)
        return resolve_for_queue(request, self.settings.default_model)
