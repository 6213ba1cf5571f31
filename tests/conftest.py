"""Shared fixtures: tiny models built from configs, saved into a temporary models folder; and
``need``/``need_module``, the one way a test says it needs something outside the venv."""

from __future__ import annotations

import importlib
import os

import pytest

from danqing.settings import OFFLINE_ENV

os.environ.update(OFFLINE_ENV)  # tests never reach the network

# Under CI (CI=true, as .ci/run sets it) every dependency is installed, so a missing one is an
# error in the set-up, not a reason to pass quietly.
def in_ci(environ=os.environ) -> bool:
    """Whether the tests run under CI: ``CI`` set to true/1/yes (GitHub Actions and .ci/run set it)."""
    return environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


IN_CI = in_ci()


def need(available: bool, what: str, install: str) -> None:
    """Skip the calling test (or, at module level, the module) when ``what`` is missing; under
    CI fail it instead.

    Args:
        available: whether the dependency is there.
        what: what is missing, for the message ("chromium at /usr/bin/chromium").
        install: how to install it ("apt-get install chromium").
    """
    if available:
        return
    message = f"needs {what}, which is missing (install: {install})"
    if IN_CI:
        pytest.fail(f"{message}; under CI=true a missing dependency is a failure, not a skip", pytrace=False)
    pytest.skip(message, allow_module_level=True)


def need_module(name: str, install: str):
    """``need`` for a Python module: the imported module, or a skip (a failure under CI)."""
    try:
        return importlib.import_module(name)
    except ImportError:
        need(False, f"the Python module {name!r}", install)


@pytest.fixture(autouse=True)
def _torch_threads():
    """torch's CPU thread count is process state: a test (or a training run it starts with
    ``num_threads``) that changes it gets it back afterwards, so no later test runs on fewer cores."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_components():
    """name -> Components for tiny-sd1, tiny-sd2 (v-prediction) and tiny-sdxl (random, seeded)."""
    from danqing.models.families import build_components

    return {
        "tiny-sd1": build_components("tiny-sd1", seed=1),
        "tiny-sd2": build_components("tiny-sd2", seed=2, prediction_type="v_prediction"),
        "tiny-sdxl": build_components("tiny-sdxl", seed=3),
    }


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory, tiny_components):
    """A models folder whose checkpoints/ holds the tiny models as diffusers folders."""
    from danqing.models.loader import save_diffusers_folder

    root = tmp_path_factory.mktemp("models")
    for sub in ("checkpoints", "vae", "lora", "embeddings", "controlnet"):
        (root / sub).mkdir()
    for name, comps in tiny_components.items():
        save_diffusers_folder(comps, root / "checkpoints" / name)
    return root


@pytest.fixture(scope="session")
def studio(models_dir, tmp_path_factory):
    from danqing import Settings, Studio

    home = tmp_path_factory.mktemp("home")
    return Studio(Settings(home=home, models_dir=models_dir, device="cpu", dtype="fp32"))


@pytest.fixture(scope="session")
def tiny_vitpose():
    """A function that saves a tiny random ViTPose (17 COCO keypoints, 64x48 input) and its image
    processor into a folder."""

    def build(folder):
        import torch
        from transformers import (VitPoseBackboneConfig, VitPoseConfig, VitPoseForPoseEstimation,
                                  VitPoseImageProcessorPil)

        torch.manual_seed(0)
        backbone = VitPoseBackboneConfig(image_size=[64, 48], patch_size=[16, 16], hidden_size=32,
                                         num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2, out_indices=[2])
        VitPoseForPoseEstimation(VitPoseConfig(backbone_config=backbone, num_labels=17)).save_pretrained(folder)
        VitPoseImageProcessorPil(size={"height": 64, "width": 48}).save_pretrained(folder)
        return folder

    return build
