"""Text-to-3D (danqing/threed/): the SDS gradient, the voxel field fitted to views of a known
sphere, meshes and their files, cameras and view prompts, checkpoints and resume, the CLI."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from danqing.cli import main
from danqing.models.families import build_components
from danqing.threed.cameras import Camera, preset, rays, sample_camera, table, turntable, view_name, view_prompt
from danqing.threed.export import extract_mesh, output_paths, read_params, write_mesh
from danqing.threed.field import VoxelField, voxel_centres
from danqing.threed.render import Background, render_rays, render_view
from danqing.threed.run import ThreeDRequest, optimise
from danqing.threed.sds import Guide, sds_gradient, sds_loss

trimesh = pytest.importorskip("trimesh")  # a runtime dependency (pyproject); the venv has it


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # small tensors: one thread is fastest (conftest gives the count back)


@pytest.fixture(scope="module")
def tiny_sd1():
    comps = build_components("tiny-sd1", seed=1)
    for m in comps.modules().values():
        m.requires_grad_(False)  # as the ModelManager places every model
    return comps


# -- score distillation -------------------------------------------------------------------------
def test_sds_gradient_on_latents_is_weighted_noise_residual(tiny_sd1):
    """d L_SDS / d z = w(t) (eps_hat - eps), eps_hat the UNet's CFG prediction at z_t for the
    same noise and timestep (computed here straight from the UNet, not through danqing's loop)."""
    guide = Guide(tiny_sd1, "a red ball", "blurry", guidance=100.0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, *guide.latent_shape(), generator=g).requires_grad_(True)
    noise = torch.randn(latents.shape, generator=g)
    t, s = 700, 100.0
    cond = guide.conds["side"]
    grad = sds_gradient(tiny_sd1.unet, latents, torch.tensor(t), noise, cond, s, guide.alphas_cumprod)
    sds_loss(latents, grad).backward()

    abar = guide.alphas_cumprod[t]
    z_t = abar.sqrt() * latents.detach() + (1 - abar).sqrt() * noise
    with torch.no_grad():
        out = tiny_sd1.unet(torch.cat([z_t, z_t]), t, encoder_hidden_states=cond.context).sample
    uncond, text = out.chunk(2)
    expected = (1 - abar) * (uncond + s * (text - uncond) - noise)
    assert torch.allclose(latents.grad, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    assert float(expected.abs().mean()) > 0  # not trivially zero
    # the view prompt is in the conditioning: "side view" differs from "front view"
    assert not torch.equal(guide.conds["side"].context, guide.conds["front"].context)


def test_sds_gradient_vanishes_when_the_model_predicts_the_true_noise_in_either_parameterisation():
    """A perfect model (eps_hat = eps, or diffusers' velocity of the same noise) gives no
    gradient: the v-prediction conversion is the inverse of ``DDPMScheduler.get_velocity``."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    g = torch.Generator().manual_seed(1)
    z, noise = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = torch.tensor(420)
    unet = SimpleNamespace(dtype=torch.float32)  # only its dtype is read
    v = sched.get_velocity(z, noise, t[None])
    for kind, answer in (("epsilon", noise), ("v_prediction", v)):
        grad = sds_gradient(unet, z, t, noise, None, 100.0, sched.alphas_cumprod, prediction_type=kind,
                            denoise_fn=lambda *a, answer=answer: answer)
        assert grad.abs().max() < 1e-5, kind


def test_timesteps_anneal_from_the_tables_range():
    from danqing.threed.sds import timestep_bounds

    s = table()["sds"]
    assert timestep_bounds(0, 100, 1000) == (int(s["t_min"] * 1000), int(s["t_max"] * 1000))
    assert timestep_bounds(99, 100, 1000)[1] == int(s["t_max_end"] * 1000)
    highs = [timestep_bounds(i, 100, 1000)[1] for i in range(100)]
    assert highs == sorted(highs, reverse=True)


def test_sds_reaches_the_field_and_never_the_model(tiny_sd1):
    request = ThreeDRequest("a red ball", steps=2, size=32, grid=16, samples=16, checkpoint_every=0)
    result = optimise(tiny_sd1, request)
    assert result.steps_done == 2 and all(math.isfinite(x) for x in result.losses)
    assert float(result.field.albedo.detach().abs().sum()) > 0  # the albedo grid moved from its zeros
    assert all(p.grad is None for m in tiny_sd1.modules().values() for p in m.parameters())


# -- the representation alone -------------------------------------------------------------------
def _sphere_field(res: int = 64) -> VoxelField:
    """Ground truth: a sphere of radius 0.5 whose albedo varies with position (x -> red, y ->
    green, z -> blue)."""
    gt = VoxelField(res, blob_strength=0)
    p = voxel_centres(res)
    with torch.no_grad():
        gt.density.copy_(((0.5 - p.norm(dim=-1)) * 60).clamp(-8, 8)[None, None])
        colour = (0.5 + 0.9 * p).clamp(0.05, 0.95)  # (R, R, R, 3)
        gt.albedo.copy_(torch.logit(colour).permute(3, 0, 1, 2)[None])
    gt.update_occupancy()
    return gt


def _cameras(n: int, offset: float) -> list[Camera]:
    return [Camera(360.0 * i / n + offset, 30 * math.sin(1.7 * i) + 10, 3.0, 40) for i in range(n)]


def test_field_fitted_to_16_views_of_a_sphere_reconstructs_held_out_views_and_meshes_watertight(tmp_path):
    torch.manual_seed(0)
    bg, size = Background((1.0, 1.0, 1.0)), 32
    gt = _sphere_field()
    train, held_out = _cameras(16, 0.0), _cameras(4, 45.0)
    with torch.no_grad():
        target = torch.cat([render_view(gt, bg, c, size, samples=64).rgb for c in train])
        truth = [render_view(gt, bg, c, size, samples=64).rgb for c in held_out]
    origins = torch.cat([rays(c, size)[0] for c in train])
    dirs = torch.cat([rays(c, size)[1] for c in train])

    field = VoxelField(32, blob_strength=0, init_density=-2)
    opt = torch.optim.Adam(field.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    for it in range(100):
        if it % 25 == 0:
            field.update_occupancy(0.1)
        idx = torch.randint(0, len(origins), (2048,), generator=g)
        out = render_rays(field, bg, origins[idx], dirs[idx], samples=32, generator=g)
        loss = ((out.rgb - target[idx]) ** 2).mean() + 1e-4 * field.total_variation()
        opt.zero_grad()
        loss.backward()
        opt.step()

    with torch.no_grad():
        field.update_occupancy(0.1)
        psnrs = [-10 * math.log10(float(((render_view(field, bg, c, size, samples=64).rgb - t) ** 2).mean()))
                 for c, t in zip(held_out, truth)]
    assert min(psnrs) >= 25.0, psnrs

    mesh = extract_mesh(field)
    assert mesh.is_watertight and len(mesh.split(only_watertight=False)) == 1
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * 0.5**3, rel=0.15)  # outward faces, the right size
    top = mesh.visual.vertex_colors[mesh.vertices[:, 2] > 0.4, :3].mean(0)
    bottom = mesh.visual.vertex_colors[mesh.vertices[:, 2] < -0.4, :3].mean(0)
    assert top[2] > bottom[2] + 100  # blue grows with z: the albedo is where it was seen

    # the files: GLB (with the parameters in its extras), OBJ and PLY load back alike
    params = {"danqing": "3d", "request": {"prompt": "a sphere"}}
    for suffix in (".glb", ".obj", ".ply"):
        path = write_mesh(mesh, tmp_path / f"sphere{suffix}", params)
        back = trimesh.load(path, force="mesh")
        assert back.is_watertight, suffix
        assert len(back.faces) == len(mesh.faces), suffix
        assert np.abs(back.visual.vertex_colors[:, :3].astype(int).mean(0) - mesh.visual.vertex_colors[:, :3].mean(0)).max() < 2
    assert json.loads(read_params(tmp_path / "sphere.glb"))["request"]["prompt"] == "a sphere"
    with pytest.raises(FileExistsError):
        write_mesh(mesh, tmp_path / "sphere.ply")


# -- cameras and view prompts -------------------------------------------------------------------
def test_cameras_follow_the_table_and_view_prompts_are_dreamfusions():
    assert [view_name(Camera(a, 10, 3, 40)) for a in (0, 30, 90, -90, 180, -170, 135)] == \
        ["front", "front", "side", "side", "back", "back", "back"]
    assert view_name(Camera(90, 75, 3, 40)) == "overhead"
    assert view_prompt("a red ball", "back") == "a red ball, " + table()["views"]["suffixes"]["back"]
    ranges = preset("dreamfusion")
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        c = sample_camera(ranges, g)
        for key in ("azimuth", "elevation", "distance", "fov"):
            lo, hi = ranges[key]
            assert lo <= getattr(c, key) <= hi
    # a ray through the middle pixel looks at the origin
    origins, dirs = rays(turntable(ranges, 1)[0], 2)
    centre = torch.nn.functional.normalize(dirs.mean(0), dim=0)
    assert torch.allclose(centre, torch.nn.functional.normalize(-origins[0], dim=0), atol=1e-5)


def test_unset_options_take_the_models_row_and_set_ones_are_kept():
    rows = table()["model_defaults"]
    tiny = ThreeDRequest("a red circle", model="danqing-tiny").with_model_defaults()
    assert (tiny.view_prompts, tiny.background) == (rows["danqing-tiny"]["view_prompts"], rows["danqing-tiny"]["background"])
    assert (tiny.view_prompts, tiny.background) == (False, "grey")
    other = ThreeDRequest("a red ball", model="sd15.safetensors").with_model_defaults()
    assert (other.view_prompts, other.background) == (True, "learned")
    kept = ThreeDRequest("a red circle", model="danqing-tiny", view_prompts=True, background="white").with_model_defaults()
    assert (kept.view_prompts, kept.background) == (True, "white")
    assert ThreeDRequest.from_dict(tiny.to_dict()) == tiny  # the written parameters re-create the resolved run


# -- checkpoints and resume ---------------------------------------------------------------------
def test_a_stopped_run_resumes_exactly_and_another_runs_checkpoint_is_refused(tiny_sd1, tmp_path):
    request = ThreeDRequest("a red ball", steps=4, size=32, grid=16, samples=16, checkpoint_every=0, seed=5)
    whole = optimise(tiny_sd1, request)
    ckpt = tmp_path / "run.ckpt"
    stopped = optimise(tiny_sd1, request, checkpoint=ckpt, on_step=lambda r: r.step < 2)
    assert stopped.interrupted and stopped.steps_done == 2
    resumed = optimise(tiny_sd1, request, checkpoint=ckpt, resume=ckpt)
    assert resumed.steps_done == 4
    assert torch.allclose(resumed.field.density, whole.field.density, atol=1e-6)
    assert torch.allclose(resumed.field.albedo, whole.field.albedo, atol=1e-6)
    with pytest.raises(ValueError, match=r"^resume: .*is from another run \(prompt='a red ball'\)"):
        optimise(tiny_sd1, request.replace(prompt="a blue ball"), resume=ckpt)


# -- the command line ---------------------------------------------------------------------------
def _run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_cli_bad_input_is_one_line_and_writes_nothing(capsys, tmp_path):
    code, _, err = _run(capsys, "--home", str(tmp_path), "--device", "cpu", "3d", "a red ball", "--out",
                        str(tmp_path / "ball.stl"))
    assert code == 2 and err.count("\n") == 1 and ".glb, .obj, .ply" in err
    code, _, err = _run(capsys, "--home", str(tmp_path), "--device", "cpu", "3d", "a red ball", "--size", "128",
                        "--model", "danqing-tiny", "--out", str(tmp_path / "ball.glb"))
    assert code == 2 and err.count("\n") == 1
    assert "draws 64x64 pictures" in err and "multiples of 8 from 32 to 64" in err
    code, _, err = _run(capsys, "--home", str(tmp_path), "3d", "a red ball", "--size", "60", "--out",
                        str(tmp_path / "ball.glb"))
    assert code == 2 and "multiple of 8" in err
    assert not any(tmp_path.glob("ball*"))
    with pytest.raises(ValueError, match="meshes are written as"):
        output_paths("x.png")


def test_cli_writes_mesh_files_parameters_and_turntable_and_resumes_only_its_own_run(capsys, tmp_path):
    base = ["--home", str(tmp_path), "--device", "cpu", "3d", "--model", "danqing-tiny", "--size", "32", "--grid", "16",
            "--samples", "16", "--frames", "4", "--threads", "1", "-q"]
    out = tmp_path / "ball.glb"
    code, printed, err = _run(capsys, *base, "a red ball", "--steps", "2", "--out", str(out))
    assert code in (0, None), err
    names = sorted(p.name for p in tmp_path.glob("ball*"))
    assert names == ["ball.ckpt", "ball.gif", "ball.glb", "ball.json", "ball.mp4", "ball.mp4.json", "ball.obj", "ball.ply"]
    params = json.loads((tmp_path / "ball.json").read_text())
    assert params["request"]["prompt"] == "a red ball" and params["steps_done"] == 2 and params["model"] == "danqing-tiny"
    for name in ("ball.glb", "ball.obj", "ball.ply"):
        assert trimesh.load(tmp_path / name, force="mesh").is_watertight == params["mesh"]["watertight"]
    from PIL import Image, ImageSequence

    with Image.open(tmp_path / "ball.gif") as gif:
        assert gif.n_frames == 4 and gif.size == (32, 32)
        gif_frames = [np.asarray(f.convert("RGB"), np.float32) for f in ImageSequence.Iterator(gif)]
    from danqing.outputs.video import probe_video, read_frames

    info = probe_video(tmp_path / "ball.mp4")
    assert (info.frames, info.width, info.height) == (4, 32, 32)
    mp4 = read_frames(tmp_path / "ball.mp4")  # the same turntable, H.264 at crf 18 against GIF's palette
    assert max(np.abs(m.astype(np.float32) - g).mean() for m, g in zip(mp4, gif_frames)) < 12
    code, printed, _ = _run(capsys, "info", str(out))
    assert json.loads(printed)["request"]["steps"] == 2
    # never overwritten; another run's checkpoint is refused in one line
    code, _, err = _run(capsys, *base, "a red ball", "--steps", "2", "--out", str(out))
    assert code == 2 and "ball.glb" in err and err.count("\n") == 1
    code, _, err = _run(capsys, *base, "a blue ball", "--steps", "3", "--resume", str(tmp_path / "ball.ckpt"),
                        "--out", str(tmp_path / "blue.glb"))
    assert code == 2 and err.count("\n") == 1 and "from another run (prompt='a red ball')" in err
    assert not any(tmp_path.glob("blue*"))
