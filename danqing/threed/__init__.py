"""Text-to-3D by score distillation (DreamFusion): a voxel field rendered volumetrically and
optimised so that every view looks like the prompt to a frozen 2D model; meshes out.

Modules: ``field`` (the voxel grid), ``cameras`` (DreamFusion's cameras, view prompts, rays),
``render`` (volume rendering, shading, background), ``sds`` (score distillation), ``run`` (the
request, the loop, checkpoints), ``export`` (marching cubes, GLB/OBJ/PLY, turntable GIF,
parameters), ``make`` (the whole run to files). docs/3d.md describes the method.
"""
