"""A1111's ``script_name`` / ``script_args`` for the two scripts danqing runs: "X/Y/Z plot" and
"Prompts from file or textbox" (matched case-insensitively, as A1111 matches titles), and the
``styles`` field. Any other script is a 422 naming it.

``script_args`` is positional, as in A1111 (``scripts/xyz_grid.py`` and
``scripts/prompts_from_file.py``, version 1.10): ``XYZ_ARGS`` and ``PROMPTS_ARGS`` name each
position with its default; a shorter list keeps the defaults of the positions it leaves out
(A1111 fills them from its UI's defaults). Every cell or line is a job of the queue, checked as
any request from the network (names, work limits) before the first one runs; an X/Y/Z plot makes
at most ``max_batch_images`` cells.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import date
from typing import Any

from danqing.apps import QueuedStudio
from danqing.apps.prompting import Prompting
from danqing.apps.prompts_file import plan_lines
from danqing.apps.xyz import NOTHING, a1111_axes, find_axis, make_axis, plan_xyz, run_xyz
from danqing.conditioning.styles import apply_styles, read_styles, styles_path
from danqing.errors import InvalidRequest
from danqing.outputs.store import next_output_path, save_png
from danqing.request import GenerationRequest
from danqing.server.jobs import png_bytes

XYZ = "x/y/z plot"
PROMPTS = "prompts from file or textbox"
SCRIPTS = (XYZ, PROMPTS)
# A1111 1.10's positions: (name, default)
XYZ_ARGS = (("x_type", 1), ("x_values", ""), ("x_values_dropdown", []), ("y_type", 0), ("y_values", ""),
            ("y_values_dropdown", []), ("z_type", 0), ("z_values", ""), ("z_values_dropdown", []),
            ("draw_legend", True), ("include_lone_images", False), ("include_sub_grids", False),
            ("no_fixed_seeds", False), ("vary_seeds_x", False), ("vary_seeds_y", False), ("vary_seeds_z", False),
            ("margin_size", 0), ("csv_mode", False))
PROMPTS_ARGS = (("checkbox_iterate", False), ("checkbox_iterate_batch", False), ("prompt_position", "start"),
                ("prompt_txt", ""))


def script_key(name: str | None) -> str | None:
    """The script a ``script_name`` selects (None: no script); unknown ones are refused."""
    if name in (None, ""):
        return None
    key = str(name).strip().lower()
    if key not in SCRIPTS:
        raise InvalidRequest("script_name", f"script {str(name)[:120]!r} is not available in danqing; available: "
                                            f"{', '.join(repr(s) for s in SCRIPTS)} (or leave it unset)")
    return key


def script_arguments(table: tuple, args: list, script: str) -> dict[str, Any]:
    """Positional ``script_args`` -> {name: value}, the defaults where the list ends early."""
    if len(args) > len(table):
        raise InvalidRequest("script_args", f"{script!r} takes at most {len(table)} arguments "
                                            f"({', '.join(n for n, _ in table)}), got {len(args)}")
    out = {name: default for name, default in table}
    out.update(zip((n for n, _ in table), args))
    return out


def styled(fields: dict, names: list[str] | None, home) -> dict:
    """A1111's ``styles`` field: the named styles of ``HOME/styles.csv`` applied to the prompts."""
    if not names:
        return fields
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise InvalidRequest("styles", "must be a list of style names")
    p, n = apply_styles(fields.get("prompt", ""), fields.get("negative_prompt", ""), names,
                        read_styles(styles_path(home)))
    return {**fields, "prompt": p, "negative_prompt": n}


def style_listing(home) -> list[dict]:
    """``/sdapi/v1/prompt-styles``: name, prompt and negative prompt of every style."""
    return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
            for s in read_styles(styles_path(home)).values()]


def _axis(kind: Any, text: Any, items: Any, img2img: bool, csv_mode: bool, name: str):
    table = a1111_axes(img2img)
    if isinstance(kind, bool) or not isinstance(kind, (int, str)):
        raise InvalidRequest("script_args", f"{name}_type must be an axis index or label, got {kind!r}")
    if isinstance(kind, int):
        if not 0 <= kind < len(table):
            raise InvalidRequest("script_args", f"{name}_type {kind} is not an axis index (0-{len(table) - 1})")
        axis = table[kind]
    else:
        axis = find_axis(kind, img2img=img2img)
    if axis.label == "Nothing":
        return NOTHING
    if axis.dropdown and not csv_mode:
        if not isinstance(items, list):
            raise InvalidRequest("script_args", f"{name}_values_dropdown must be a list of {axis.label} values")
        return make_axis(axis, "", items)
    if not isinstance(text, str):
        raise InvalidRequest("script_args", f"{name}_values must be a string, got {text!r}")
    return make_axis(axis, text)


def _flag(args: dict, name: str) -> bool:
    v = args[name]
    if not isinstance(v, bool):
        raise InvalidRequest("script_args", f"{name} must be true or false, got {v!r}")
    return v


def run_script(state, key: str, body, fields: dict, *, img2img: bool, init=None, mask=None) -> dict:
    """Run an A1111 script over the request ``fields`` (A1111 -> danqing, styles applied);
    returns A1111's response (``images``, ``parameters``, ``info``)."""
    table = XYZ_ARGS if key == XYZ else PROMPTS_ARGS
    raw = list(body.script_args or [])
    if key == PROMPTS and len(raw) == 3 and raw[2] not in ("start", "end"):
        raw = [raw[0], raw[1], "start", raw[2]]  # before 1.7 there was no prompt_position
    args = script_arguments(table, raw, key)
    axes = None
    if key == XYZ:  # read before the request stores its uploads
        csv_mode = _flag(args, "csv_mode")
        axes = [_axis(args[f"{n}_type"], args[f"{n}_values"], args[f"{n}_values_dropdown"], img2img, csv_mode, n)
                for n in "xyz"]
        if args["margin_size"] not in (0, 0.0):
            raise InvalidRequest("script_args", "margin_size: grid margins are not supported by danqing; use 0")
    base = state.prepare_request(fields, init_image=init, mask=mask, overrides=body.override_settings or None)
    home = state.settings.home
    save = body.save_images and not body.do_not_save_samples
    if key == XYZ:
        return _xyz(state, base, axes, args, img2img, home, save, body)
    return _prompts(state, body, base, args, home, save, random_seed=fields.get("seed", -1) == -1)


def _checked(state, request: GenerationRequest) -> GenerationRequest:
    """A cell or line as any request from the network: names resolved, work limits."""
    return state.prepare_request(request.model_dump())


def _xyz(state, base: GenerationRequest, axes: list, args: dict, img2img: bool, home, save: bool, body) -> dict:
    fixed = not _flag(args, "no_fixed_seeds")
    if not fixed:
        base = base.replace(seed=-1)
    vary = tuple(_flag(args, f"vary_seeds_{n}") for n in "xyz")
    plan = plan_xyz(base, *axes, max_cells=state.server.max_batch_images, prompting=Prompting(home, read_styles(
        styles_path(home))), fixed_seed=fixed, vary_seeds=vary, dynamic=False)
    for cell in plan.cells:
        cell.request = _checked(state, cell.request)
    result = run_xyz(QueuedStudio(state, "a1111"), plan, save=save, legend=_flag(args, "draw_legend"))
    images = [result.combined_grid()]
    texts = [result.grid_infotexts[0]]
    if _flag(args, "include_sub_grids") and len(result.grids) > 1:
        images += result.grids
        texts += result.grid_infotexts
    if save:
        folder = state.settings.outputs_dir / ("img2img-grids" if img2img else "txt2img-grids") / date.today().isoformat()
        save_png(images[0], next_output_path(folder, plan.cells[0].request.seed), texts[0])
    owners = [plan.cells[0].request] * len(images)
    if _flag(args, "include_lone_images"):
        images += result.images
        texts += result.infotexts
        owners += [c.request for c in plan.cells]
    return _response(body, images, texts, owners)


def _prompts(state, body, base: GenerationRequest, args: dict, home, save: bool, *, random_seed: bool) -> dict:
    iterate, same = _flag(args, "checkbox_iterate"), _flag(args, "checkbox_iterate_batch")
    if args["prompt_position"] not in ("start", "end"):
        raise InvalidRequest("script_args", f"prompt_position must be start or end, got {args['prompt_position']!r}")
    if not isinstance(args["prompt_txt"], str):
        raise InvalidRequest("script_args", "prompt_txt must be a string of lines")
    if random_seed and not (iterate or same):
        base = base.replace(seed=-1)  # A1111: every line its own random seed
    jobs = plan_lines(base, args["prompt_txt"], styles=read_styles(styles_path(home)),
                      position=args["prompt_position"], iterate_seed=iterate, same_seed=same)
    requests = [_checked(state, j.request) for j in jobs]
    if sum(r.batch_size * r.batch_count for r in requests) > state.server.max_batch_images:
        raise InvalidRequest("script_args", f"the lines ask for more than {state.server.max_batch_images} pictures "
                                            f"(max_batch_images)")
    studio = QueuedStudio(state, "a1111")
    images, texts, owners = [], [], []
    for r in requests:
        result = studio.generate(r, save=save)
        images += result.images
        texts += result.infotexts
        owners += [result.request] * len(result.images)
    return _response(body, images, texts, owners)


def _response(body, images: list, texts: list[str], requests: list[GenerationRequest]) -> dict:
    """A1111's answer: base64 PNGs (each with its infotext), the body echoed, ``info`` as a JSON string."""
    first = requests[0]
    info = {
        "prompt": first.prompt, "all_prompts": [r.prompt for r in requests], "negative_prompt": first.negative_prompt,
        "all_negative_prompts": [r.negative_prompt for r in requests], "seed": first.seed,
        "all_seeds": [r.seed for r in requests], "subseed": first.subseed, "all_subseeds": [r.subseed for r in requests],
        "subseed_strength": first.subseed_strength, "width": first.width, "height": first.height,
        "sampler_name": first.sampler, "cfg_scale": first.cfg_scale, "steps": first.steps,
        "batch_size": first.batch_size, "sd_model_name": first.model, "clip_skip": first.clip_skip,
        "index_of_first_image": 0, "infotexts": texts, "styles": list(body.styles or []),
        "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.gmtime()), "extra_generation_params": {},
    }
    encoded = [base64.b64encode(png_bytes(img, t)).decode() for img, t in zip(images, texts)] if body.send_images else []
    echo = body.model_dump()
    if "init_images" in echo:
        echo["init_images"], echo["mask"] = None, None
    return {"images": encoded, "parameters": echo, "info": json.dumps(info)}
