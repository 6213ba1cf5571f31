"""What a text-to-3D run leaves: a mesh with vertex colours (GLB, OBJ, PLY), the run's parameters
as JSON beside it (and in the GLB's extras), a turntable as GIF and MP4 and the last checkpoint.

The mesh is scikit-image's marching cubes (Lewiner et al. 2003) of the density grid, padded
with empty space so that the surface closes; trimesh writes the files. Every file is written
atomically (``danqing.files``) and none is overwritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from danqing.errors import ImageError, InvalidRequest
from danqing.files import atomic_save, atomic_write_text, exists_message
from danqing.outputs.video import save_video, sidecar
from danqing.threed.cameras import turntable
from danqing.threed.field import VoxelField
from danqing.threed.render import Background, render_view, to_picture

MESH_FORMATS = (".glb", ".obj", ".ply")
MESH_LEVEL = 10.0  # density of the surface: a 48-sample ray loses ~27% of its light per sample there


@dataclass(frozen=True)
class OutputPaths:
    """The files of one run, named after ``--out`` NAME.EXT: NAME.glb/.obj/.ply, NAME.json (the
    parameters), NAME.gif and NAME.mp4 (the turntable; the MP4 with its NAME.mp4.json sidecar, as
    every danqing video), NAME.ckpt (the last checkpoint)."""

    mesh: Path

    def meshes(self) -> list[Path]:
        return [self.mesh] + [self.mesh.with_suffix(s) for s in MESH_FORMATS if s != self.mesh.suffix.lower()]

    @property
    def params(self) -> Path:
        return self.mesh.with_suffix(".json")

    @property
    def turntable(self) -> Path:
        return self.mesh.with_suffix(".gif")

    @property
    def video(self) -> Path:
        return self.mesh.with_suffix(".mp4")

    @property
    def checkpoint(self) -> Path:
        return self.mesh.with_suffix(".ckpt")

    def written(self) -> list[Path]:
        return [*self.meshes(), self.params, self.turntable, self.video, sidecar(self.video)]


def output_paths(out: str | Path) -> OutputPaths:
    """``--out`` as the run's files; an extension that is not a mesh format lists the allowed ones."""
    path = Path(out)
    if path.suffix.lower() not in MESH_FORMATS:
        raise InvalidRequest("out", f"{str(out)!r}: meshes are written as {', '.join(MESH_FORMATS)}; give NAME.glb, "
                                    f"NAME.obj or NAME.ply")
    return OutputPaths(path)


def refuse_existing(paths: OutputPaths) -> None:
    """One line naming the first output that exists (danqing never overwrites)."""
    for p in paths.written():
        if p.exists():
            raise InvalidRequest("out", exists_message(p))


@torch.no_grad()
def extract_mesh(fld: VoxelField, level: float = MESH_LEVEL):
    """The ``level`` iso-surface of the field's density as a ``trimesh.Trimesh`` in world
    coordinates, its vertex colours the albedo there.

    Raises:
        InvalidRequest: the density never reaches ``level`` (nothing was made).
    """
    import trimesh
    from skimage.measure import marching_cubes

    sigma = np.pad(fld.sigma_grid().cpu().numpy(), 1)  # zero density around: the surface closes
    if sigma.max() <= level:
        raise InvalidRequest("mesh", f"the field's density never reaches {level}: there is no surface to mesh")
    verts, faces, _, _ = marching_cubes(sigma, level=level)
    xyz = (verts[:, ::-1] - 1) * 2.0 / (fld.res - 1) - 1.0  # [z, y, x] grid index -> (x, y, z), padding removed
    # the [z, y, x] -> (x, y, z) swap is a reflection: it turns scikit-image's winding outwards
    pts = torch.from_numpy(np.ascontiguousarray(xyz)).float().to(fld.density.device)
    _, albedo, _ = fld.query(pts, normals=False)
    colours = np.concatenate([(albedo.cpu().numpy() * 255).round(), np.full((len(xyz), 1), 255)], axis=1).astype(np.uint8)
    return trimesh.Trimesh(vertices=xyz, faces=np.ascontiguousarray(faces), vertex_colors=colours, process=True)


def write_mesh(mesh, path: Path, params: dict | None = None) -> Path:
    """``mesh`` as GLB, OBJ or PLY (by the extension), atomically; the GLB carries ``params`` in
    its extras."""
    kind = path.suffix.lower().lstrip(".")
    if kind == "glb":
        mesh = mesh.copy()
        mesh.metadata = {"danqing": params} if params else {}  # written as the mesh's glTF extras
        data = mesh.export(file_type="glb")
    else:
        data = mesh.export(file_type=kind)
    if isinstance(data, str):
        data = data.encode("utf-8")
    return atomic_save(path, lambda p: p.write_bytes(data))


@torch.no_grad()
def turntable_frames(fld: VoxelField, bg: Background, ranges: dict, *, size: int, frames: int, samples: int = 64,
                     ambient: float = 0.3) -> list:
    """``frames`` lambertian-shaded views around the object, lit from above each camera."""
    fld.update_occupancy()
    out = []
    for cam in turntable(ranges, frames):
        light = torch.nn.functional.normalize(cam.position() + torch.tensor([0.0, 0.0, 1.0]) * cam.distance, dim=0)
        view = render_view(fld, bg, cam, size, samples=samples, shading="lambertian", light=light, ambient=ambient)
        out.append(to_picture(view.image()))
    return out


def write_turntable_video(frames: list, path: Path, params: dict, fps: int = 10) -> list[Path]:
    """The turntable as an MP4 (H.264, the parameters in its comment tag and its sidecar)."""
    return save_video(frames, path, fps, json.dumps(params, ensure_ascii=False))


def write_gif(frames: list, path: Path, ms_per_frame: int = 100) -> Path:
    """An endlessly looping GIF (Pillow), atomically."""
    return atomic_save(path, lambda p: frames[0].save(p, format="GIF", save_all=True, append_images=frames[1:],
                                                      duration=ms_per_frame, loop=0))


def write_params(params: dict, path: Path) -> Path:
    return atomic_write_text(path, json.dumps(params, indent=2, ensure_ascii=False) + "\n")


def read_params(path: Path) -> str:
    """The parameters of a run, as JSON text, from its NAME.json, or from a mesh or turntable
    whose NAME.json lies beside it (a GLB: its extras when there is no JSON file)."""
    path = Path(path)
    side = path if path.suffix.lower() == ".json" else path.with_suffix(".json")
    if side.is_file():
        return side.read_text(encoding="utf-8")
    if path.suffix.lower() == ".glb" and path.is_file():
        import trimesh

        scene = trimesh.load(path, file_type="glb")
        geoms = list(scene.geometry.values()) if hasattr(scene, "geometry") else [scene]
        for g in geoms:
            if "danqing" in g.metadata:
                return json.dumps(g.metadata["danqing"], indent=2, ensure_ascii=False)
    raise ImageError(f"{path} carries no danqing 3d parameters (no {side.name} beside it)")


__all__ = ["MESH_FORMATS", "OutputPaths", "extract_mesh", "output_paths", "read_params", "turntable_frames",
           "write_gif", "write_mesh", "write_params", "write_turntable_video"]
