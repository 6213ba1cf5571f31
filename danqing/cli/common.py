"""What every command shares: the Typer app and its global options, ``main``, where ``--out``
writes (``out_target``) and the run of one generation request with a progress bar.

Library modules that import torch, numpy or Pillow (the studio, requests, editing, picture
files) are imported inside the command bodies, so that ``danqing --help`` answers in well under
a second without loading them; every command module follows this rule.
"""

from __future__ import annotations

import os
import sys
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import typer

from danqing.errors import DanqingError, InvalidRequest
from danqing.files import exists_message, is_url
from danqing.outputs.infotext import format_infotext, parse_infotext
from danqing.settings import Settings, force_offline, quiet_libraries

app = typer.Typer(
    help="丹青 danqing: offline AI painting studio.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    rich_markup_mode=None,  # help as written: rich markup would eat [a:b:N] and [default: ...]
    context_settings={"max_content_width": 120},  # up to 120 columns where the terminal has them
)


@app.callback()
def _root(
    ctx: typer.Context,
    home: Optional[Path] = typer.Option(None, help="danqing home (models/ and outputs/ inside) [default: $DANQING_HOME or the current folder]."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help="Models folder (checkpoints/, vae/, lora/, ...) [default: HOME/models]."),
    device: Optional[str] = typer.Option(None, help="auto (cuda > mps > cpu), cpu, cuda, cuda:1, mps [default: auto]."),
    dtype: Optional[str] = typer.Option(None, help="auto (fp16 on GPU, fp32 on CPU), fp32, fp16, bf16 [default: auto]."),
):
    if dtype is not None and dtype not in ("auto", "fp32", "fp16", "bf16"):
        raise InvalidRequest("dtype", f"must be one of auto, fp32, fp16, bf16, got {dtype!r}")
    ctx.obj = Settings.from_env(home=home, models_dir=models_dir, device=device, dtype=dtype)


def main(argv: list[str] | None = None) -> None:
    """Entry point: offline first, then the Typer app; our errors become one line and exit 2."""
    args = sys.argv[1:] if argv is None else list(argv)
    force_offline()
    try:
        if "--help" not in args:  # quieting imports diffusers and transformers; help needs neither
            quiet_libraries()
        app(args=args, standalone_mode=True)
    except (DanqingError, FileExistsError) as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)


# ---------------------------------------------------------------------------------------------
# --out: one rule for every command that writes pictures
# ---------------------------------------------------------------------------------------------
OUT_RULE = ("NAME.png writes that file (several pictures: NAME.png, NAME-1.png, NAME-2.png, ...); "
            "a folder (a name ending with /, an existing folder, or a name without an extension) "
            "gets danqing's own file names")


@dataclass(frozen=True)
class OutTarget:
    """Where a command writes its pictures: a folder (file names chosen by danqing) or a file
    name (with ``-1``, ``-2``, ... for the pictures after the first)."""

    folder: Optional[Path] = None
    file: Optional[Path] = None

    def files(self, count: int, start: int = 0) -> list[Path]:
        """The names of pictures ``start`` .. ``start + count - 1`` of a file target:
        NAME.png, NAME-1.png, NAME-2.png, ..."""
        f = self.file
        return [f if i == 0 else f.with_name(f"{f.stem}-{i}{f.suffix}") for i in range(start, start + count)]

    def path(self, default_name: str) -> Path:
        """The one file of a single-picture command: the file name, or ``default_name`` in the folder."""
        return self.file if self.file is not None else self.folder / default_name

    def beside(self) -> Path:
        """The folder where side files (an outpaint canvas and mask) go."""
        return self.folder if self.folder is not None else self.file.parent

    def check_free(self, count: int, variants: tuple[str, ...] = ("",), start: int = 0) -> None:
        """Refuse (one line) before any work when one of the ``count`` planned files from picture
        ``start`` on exists (with ``variants``: also NAME-source.png and the like beside each)."""
        if self.file is not None:
            refuse_existing(*(p.with_name(p.stem + v + p.suffix) for p in self.files(count, start) for v in variants))


def refuse_existing(*paths: Path) -> None:
    """One line naming the first of ``paths`` that exists: danqing never overwrites."""
    for p in paths:
        if p.exists():
            raise InvalidRequest("out", exists_message(p))


def out_target(out: Optional[str], default: Path, *, url_ok: bool = False) -> OutTarget:
    """``--out`` as a target (``OUT_RULE``); ``default`` (a folder, or a ``.png`` file) when None.
    With ``url_ok`` (commands whose pictures ``Studio.generate`` saves), an fsspec URL names a
    folder (``s3://bucket/renders/``), and so does a URL ``default`` (``DANQING_OUTPUTS``).

    Raises:
        InvalidRequest: a file name whose extension is not ``.png``; a URL where only a local
            name is allowed, or a URL that names a file.
    """
    if out is None and is_url(default):
        return OutTarget(folder=default)
    if out is None:
        return OutTarget(file=default) if default.suffix.lower() == ".png" else OutTarget(folder=default)
    text = str(out)
    if is_url(text):
        if not url_ok:
            raise InvalidRequest("out", f"{text!r}: this command writes local files; give a local NAME.png or folder")
        if text.lower().endswith(".png"):
            raise InvalidRequest("out", f"{text!r}: a URL names a folder for danqing's own file names; "
                                        f"end it with / (e.g. s3://bucket/renders/)")
        return OutTarget(folder=text)  # type: ignore[arg-type]  # a URL folder (outputs.place)
    path = Path(text)
    if text.endswith(("/", os.sep)) or path.is_dir():
        return OutTarget(folder=path)
    suffix = path.suffix.lower()
    if suffix == ".png":
        return OutTarget(file=path)
    if not suffix:
        return OutTarget(folder=path)
    raise InvalidRequest("out", f"{text!r}: pictures are written as PNG; give NAME.png for a file, or a folder "
                                f"(end the name with /)")


OUT_HELP = ("Output: NAME.png, or a folder (a name ending with /, an existing folder, or a name without an "
            "extension) [default: {}]. Several pictures into NAME.png are NAME.png, NAME-1.png, ...")


def dated(settings: Settings, kind: str) -> Path:
    """``outputs/KIND/YYYY-MM-DD``, where A1111 puts its pictures."""
    import datetime

    return settings.outputs_dir / kind / datetime.date.today().isoformat()


def dated_pictures(settings: Settings, kind: str):
    """``dated`` for pictures that ``Studio.generate`` saves: under ``settings.outputs_url``
    (an fsspec URL, ``DANQING_OUTPUTS=s3://...``) when set."""
    from danqing.outputs.place import dated_folder  # lazy: Pillow

    return dated_folder(settings, kind)


# ---------------------------------------------------------------------------------------------
# Running requests
# ---------------------------------------------------------------------------------------------
def make_studio(settings: Settings):
    """The run's Studio, on a device checked first (``check_device``). Say which device and dtype
    it runs on (``announce_device``) when the work starts, after the options passed the studio's
    checks, so that a bad option stays one line."""
    check_device(settings.device)
    from danqing.studio import Studio  # lazy: imports torch

    return Studio(settings)


def with_native_size(settings: Settings, fields: dict) -> dict:
    """``fields`` with the picture size the model was trained at where they give none (64 for
    danqing-tiny, 512 for SD1, 1024 for SDXL: ``models.native``), as the web UI starts."""
    if "width" in fields and "height" in fields:
        return fields
    from danqing.models.native import native_side  # lazy: reads the model's configs
    from danqing.models.registry import Registry

    side = native_side(Registry(settings.models_dir), fields.get("model") or settings.default_model)
    return {"width": side, "height": side, **fields}


_ANNOUNCED: "weakref.WeakSet" = weakref.WeakSet()  # the run's studio, once its device was said


def announce_device(studio) -> None:
    """One stderr line, once per run (per studio): the device and dtype its models are placed on."""
    models = getattr(studio, "models", None)  # None: a stand-in studio without models
    if models is None or studio in _ANNOUNCED:
        return
    _ANNOUNCED.add(studio)
    dtype = str(models.dtype).removeprefix("torch.")
    typer.echo(f"device: {models.device}, dtype: {dtype}", err=True)


def check_device(name: str) -> None:
    """Refuse a device this machine does not have (one line) before anything is loaded.

    Raises:
        InvalidRequest: not a torch device name, or a device whose backend is unavailable here.
    """
    if name == "auto":
        return
    import torch  # lazy: --help must not import torch

    allowed = "use auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidRequest("device", f"{name!r} is not a device; {allowed}") from None
    if device.type == "cpu":
        return
    backend = torch.backends.mps if device.type == "mps" else getattr(torch, device.type, None)
    if backend is None or not backend.is_available():
        why = ("this torch has no CUDA support" if device.type == "cuda" and torch.version.cuda is None
               else f"no {device.type} device is available on this machine")
        raise InvalidRequest("device", f"{name}: {why} (torch {torch.__version__}); use --device cpu or auto")
    count = backend.device_count() if hasattr(backend, "device_count") else 1
    if device.index is not None and device.index >= count:
        raise InvalidRequest("device", f"{name}: this machine has {count} {device.type} device(s) "
                                       f"({device.type}:0 to {device.type}:{count - 1})")


def new_picture_path(target: OutTarget, stem: str) -> Path:
    """The one file of a single-picture command: ``--out NAME.png`` (refused when it exists:
    danqing never overwrites), else the folder's next ``NNNNN-STEM.png``, numbered with the
    counter ``generate`` numbers its pictures with (A1111's)."""
    if target.file is not None:
        refuse_existing(target.file)
        return target.file
    from danqing.outputs.store import next_output_path  # lazy: Pillow

    return next_output_path(target.folder, stem)  # type: ignore[arg-type]  # the name after the counter


def control_units(specs: list[str], preprocess: bool) -> tuple:
    """``--control TYPE:IMAGE[:WEIGHT]`` options -> ControlUnits."""
    from danqing.conditioning.control import parse_control_spec  # lazy: imports torch

    return tuple(parse_control_spec(s, preprocess=preprocess) for s in specs)


def pictures_of(request) -> int:
    return request.batch_size * request.batch_count


def run_generate(settings: Settings, request, target: OutTarget, quiet: bool, *, source_infotext: str | None = None,
                 start: int = 0, studio=None, extra_params: dict | None = None) -> None:
    """Run one request with a progress bar and write its pictures to ``target`` (a file target:
    pictures ``start`` ... of its names); print each path with its seed. ``extra_params``: more
    infotext pairs (``Studio.generate``)."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    studio = studio or make_studio(settings)
    single_file = target.file is not None
    if single_file:
        target.check_free(pictures_of(request), start=start)
    total = request.steps * request.batch_count
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeRemainingColumn(), console=console, disable=quiet, transient=True) as progress:
        task = progress.add_task("sampling", total=total)

        def on_step(info):
            announce_device(studio)  # at the first step: the request passed the studio's checks
            progress.update(task, completed=info.batch_index * info.total + info.step)

        result = studio.generate(request, on_step=on_step, save=not single_file, out_dir=target.folder,
                                 extra_params=extra_params)
    if single_file:
        _save_files(result, target.files(len(result.images), start))
    warnings = list(result.warnings)
    if source_infotext is not None:  # --from: the embeddings the original used, as they are now
        from danqing.customise.embeddings import ti_hash_changes  # lazy: imports torch

        warnings += ti_hash_changes(parse_infotext(source_infotext)[2].get("TI hashes"),
                                    parse_infotext(result.infotexts[0])[2].get("TI hashes"))
    for line in warnings:
        console.print(f"[yellow]warning:[/] {line}")
    if result.request.model == "danqing-tiny-random":
        console.print("[yellow]note:[/] model 'danqing-tiny-random' has random weights (a test model): expect noise patterns, not pictures.")
    for path, seed in zip(result.paths, result.seeds):
        print(f"{path}  seed={seed}")
    console.print(f"{len(result.images)} image(s) in {result.timings['total']:.2f}s (sampling {result.timings['sample']:.2f}s)")


def _save_files(result, paths: list[Path]) -> None:
    """The pictures of ``result`` under the given names; Prompt-to-Prompt's unedited pictures as
    NAME-source.png beside them, as ``Studio.generate`` writes them into a folder."""
    from danqing.outputs.store import save_png  # lazy: Pillow

    for img, path, text in zip(result.images, paths, result.infotexts):
        result.paths.append(save_png(img, path, text))
    for img, path, text in zip(result.sources or [], paths, result.infotexts):
        # the source's request is the identity edit: the source prompt, no reweighting
        _, negative, params = parse_infotext(text)
        params.pop("P2P reweight", None)
        save_png(img, path.with_name(path.stem + "-source.png"),
                 format_infotext(result.request.p2p_source, negative, params))
