"""Training configs of the companion models trained on our own worlds: danqing-tiny-clip,
danqing-tiny-motion and danqing-portrait-faces (TOML files validated as in ``config``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from danqing.training.config import _Strict


# ---------------------------------------------------------------------------------------------
# danqing-tiny-clip: a contrastive image-text model of the shapes world (danqing.training.clip)
# ---------------------------------------------------------------------------------------------
class ClipDataConfig(_Strict):
    n_images: int = Field(20000, ge=16)        # training-split scenes, rendered once
    size: int = Field(64, ge=16)               # picture side (the vision model's image_size)
    captions_per_image: int = Field(4, ge=1)   # phrasings per scene, alternating English and Chinese
    hard_negatives: int = Field(8, ge=0)       # one-attribute-changed captions kept per phrasing
    # also train on the held-out (colour, shape) pairs: "train" never shows them, so the model
    # must put together a colour and a shape it only saw apart (the evaluation's scenes are
    # always other scenes than the training ones)
    split: Literal["train", "all"] = "train"
    augment: float = Field(0.5, ge=0, le=1)    # share of pictures blurred and noised (generated pictures are soft)
    # hard negatives drawn at random ("uniform": 7 colour and 5 shape changes per object against
    # 1-4 of place) or colour, shape and place changes in turn ("even")
    negative_kinds: Literal["uniform", "even"] = "uniform"
    # each picture in the batch beside its place twin (``synthetic.scenes.place_twin``)
    place_twins: bool = False
    seed: int = 0


class ClipModelConfig(_Strict):
    projection_dim: int = Field(64, ge=8)
    vision_hidden: int = Field(128, ge=16)
    vision_layers: int = Field(4, ge=1)
    vision_heads: int = Field(4, ge=1)
    patch_size: int = Field(8, ge=2)
    text_hidden: int = Field(64, ge=16)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(4, ge=1)
    # patch positions at the start: transformers' "random" (std 0.02 against a patch's 0.32: no
    # run learnt places) or MAE's 2D "sincos" table (then trained)
    vision_positions: Literal["random", "sincos"] = "random"
    init_from: str | None = None  # continue this CLIP model (a bundled name or a folder) of the same shape


class ClipOptimConfig(_Strict):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(128, ge=2)
    negatives_per_image: int = Field(4, ge=0)  # hard negatives drawn per picture and step
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(200, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0


class ClipOutputConfig(_Strict):
    output_dir: str = "runs/danqing-tiny-clip"
    log_every: int = Field(100, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_scenes: int = Field(200, ge=10)       # held-out retrieval scenes evaluated along the run
    num_threads: int = Field(0, ge=0)          # torch CPU threads; 0 = torch's default


class ClipTrainConfig(_Strict):
    """danqing-tiny-clip (``danqing.training.clip``)."""

    data: ClipDataConfig = ClipDataConfig()
    model: ClipModelConfig = ClipModelConfig()
    train: ClipOptimConfig = ClipOptimConfig()
    output: ClipOutputConfig = ClipOutputConfig()


# ---------------------------------------------------------------------------------------------
# danqing-tiny-motion: an AnimateDiff motion module for danqing-tiny (danqing.training.motion)
# ---------------------------------------------------------------------------------------------
class MotionDataConfig(_Strict):
    n_clips: int = Field(2000, ge=8)           # training clips of the moving shapes world, rendered once
    frames: int = Field(16, ge=2, le=32)       # frames per clip (the module's window)
    size: int = Field(64, ge=16)               # picture side
    captions_per_clip: int = Field(4, ge=1)    # phrasings per clip, English and Chinese in turn
    caption_dropout: float = Field(0.1, ge=0, le=1)  # share of steps trained on the empty caption (for CFG)
    # the directions of the training (and evaluation) clips: all four, or one for a motion LoRA
    directions: list[Literal["right", "left", "up", "down"]] = ["right", "left", "up", "down"]
    # the kinds of clips: straight lines only, or also arcs, growing, shrinking and recolouring
    # objects (each (colour, shape) pair's held-out change left out; the evaluation stays on lines)
    kinds: list[Literal["line", "arc", "grow", "shrink", "recolour"]] = ["line"]
    # each caption as prompt travel (synthetic.motion.travel_prompt): the frames' contexts go from
    # the still world's caption of the object at its start to the one at its end (lines only)
    travel: bool = False
    seed: int = 0

    @model_validator(mode="after")
    def _travel_is_for_lines(self):
        if self.travel and self.kinds != ["line"]:
            raise ValueError("travel: travel captions are straight lines; set kinds = [\"line\"]")
        return self


class MotionModelConfig(_Strict):
    init_from: str = "danqing-tiny"            # the frozen text-to-image model the module is for
    layers_per_block: int = Field(1, ge=1)     # motion layers per UNet block
    heads: int = Field(2, ge=1)                # temporal attention heads
    norm_groups: int = Field(8, ge=1)
    max_frames: int = Field(32, ge=2)          # the temporal position table: the longest window
    mid_block: bool = True                     # a motion layer in the UNet's mid block too
    # a LoRA of this rank on the still UNet's cross-attention trains beside the motion layers
    # (0: none): the motion words ("moving to the right") reach the pictures' features only
    # through cross-attention, which the still model learnt without them. Written as
    # OUTPUT_DIR/NAME.safetensors, used as <lora:NAME:1> with the module (as AnimateDiff v3's
    # adapter LoRA is)
    text_lora_rank: int = Field(0, ge=0)
    name: str = "danqing-tiny-motion"          # the LoRA's file name
    # start from a trained module instead of zero output projections: a MotionAdapter folder
    # (a path, or the name of one in models/motion/ or bundled); its cross-attention LoRA, when
    # text_lora_rank is set, from resume_lora (a kohya file: a path or a LoRA name)
    resume_from: str = ""
    resume_lora: str = ""
    # above 0: train a MotionLoRA of this rank (AnimateDiff's: LoRAs on the motion layers' temporal
    # attention) for the module resume_from, which stays frozen with resume_lora folded in;
    # written as OUTPUT_DIR/NAME.safetensors for <lora:NAME:1> in a video prompt
    motion_lora_rank: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _motion_lora_needs_a_module(self):
        if self.motion_lora_rank and not self.resume_from:
            raise ValueError("motion_lora_rank: a motion LoRA is trained for a trained module; name it in resume_from")
        return self


class MotionOptimConfig(_Strict):
    steps: int = Field(3000, ge=1)
    batch_size: int = Field(4, ge=1)           # clips per step
    # share of each batch noised at the high-noise end (timesteps 700-999), where the picture no
    # longer shows where the object is and only the caption can say which way it moves
    high_noise_share: float = Field(0.0, ge=0, le=1)
    # the loss of a clip is weighted by max(1, min(1/SNR(t), x0_weight_max)): 1 = the plain
    # epsilon objective. Above 1 a high-noise clip's loss counts like its error in the picture
    # (x0) rather than in the noise: the epsilon loss scales a wrong layout (where the object is,
    # so which way it goes) by SNR(t), near 0.005 at the last timestep, so the plain objective
    # all but ignores the one thing only the caption can decide
    x0_weight_max: float = Field(1.0, ge=1)
    # contrast pairs: the clips come as twins going opposite ways (synthetic.motion.training_pairs),
    # and each batch holds batch_size / 2 twins at one timestep and one noise per twin pair, so
    # at high noise the two noisy clips are all but the same and only their captions tell the
    # two targets apart: the loss cannot fall without reading which way the caption says
    mirror_pairs: bool = False
    lr: float = Field(3e-4, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    seed: int = 0

    @model_validator(mode="after")
    def _pairs_fill_batches(self):
        if self.mirror_pairs and self.batch_size % 2:
            raise ValueError(f"mirror_pairs needs an even batch_size (twins), not {self.batch_size}")
        return self


class MotionOutputConfig(_Strict):
    output_dir: str = "runs/danqing-tiny-motion"
    log_every: int = Field(100, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_clips: int = Field(8, ge=1)           # held-out clips generated and scored along the run
    eval_steps: int = Field(20, ge=1)          # sampling steps of those clips (DPM++ 2M, CFG 7)
    num_threads: int = Field(0, ge=0)          # torch CPU threads; 0 = torch's default


class MotionTrainConfig(_Strict):
    """danqing-tiny-motion (``danqing.training.motion``)."""

    data: MotionDataConfig = MotionDataConfig()
    model: MotionModelConfig = MotionModelConfig()
    train: MotionOptimConfig = MotionOptimConfig()
    output: MotionOutputConfig = MotionOutputConfig()


# ---------------------------------------------------------------------------------------------
# danqing-portrait-faces: the portrait world's face recogniser (danqing.training.faces)
# ---------------------------------------------------------------------------------------------
class FacesDataConfig(_Strict):
    n_images: int = Field(24000, ge=64)        # training-split portraits, rendered once
    size: int = Field(64, ge=32)               # the render's side (the crop the network reads has the same side)
    augment: float = Field(0.5, ge=0, le=1)    # share of pictures blurred and noised (generated pictures are soft)
    shift: int = Field(3, ge=0)                # random shift of the crop, pixels (the framing is not exact)
    seed: int = 0


class FacesModelConfig(_Strict):
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of each stage (each halves the side)
    dim: int = Field(128, ge=8)                # embedding size
    context: float = Field(2.17, gt=1)         # the crop's side / the face box's width (hair and shoulders in)
    margin: float = Field(0.25, ge=0)          # CosFace margin
    scale: float = Field(16.0, gt=0)           # CosFace scale


class FacesOptimConfig(_Strict):
    steps: int = Field(1200, ge=1)
    batch_size: int = Field(96, ge=2)
    lr: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    weight_decay: float = Field(5e-4, ge=0)
    seed: int = 0


class FacesOutputConfig(_Strict):
    output_dir: str = "runs/danqing-portrait-faces"
    log_every: int = Field(100, ge=1)
    eval_every: int = Field(400, ge=1)
    eval_people: int = Field(120, ge=4)        # held-out people measured (4 pictures each)
    num_threads: int = Field(0, ge=0)          # torch CPU threads; 0 = torch's default


class FacesTrainConfig(_Strict):
    """danqing-portrait-faces (``danqing.training.faces``)."""

    data: FacesDataConfig = FacesDataConfig()
    model: FacesModelConfig = FacesModelConfig()
    train: FacesOptimConfig = FacesOptimConfig()
    output: FacesOutputConfig = FacesOutputConfig()
