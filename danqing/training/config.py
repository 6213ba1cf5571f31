"""Training configs: TOML files validated into frozen pydantic models (unknown keys refused)."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from danqing.errors import InvalidRequest


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Strict):
    source: str = "synthetic"           # "synthetic", or a folder of images with .txt captions / metadata.jsonl
    n_images: int = Field(20000, ge=1)  # synthetic scenes to render
    size: int = Field(64, ge=16)        # training resolution (square, multiple of 8)
    seed: int = 0
    captions_per_image: int = Field(6, ge=1)  # synthetic: phrasings per scene, half English, half Chinese
    # synthetic: the shapes world, the portrait world (danqing.synthetic.portraits) or a mix of both
    world: Literal["shapes", "portraits", "mix"] = "shapes"
    portrait_share: float = Field(0.5, ge=0, le=1)  # mix: the fraction of portraits
    portrait_drop: float = Field(0.0, ge=0, lt=1)   # portraits: each identity word's chance to be left out
    # shapes captions (synthetic.recaption): "varied" phrasings, "short" (the objects only), "detailed" (all)
    captions: Literal["varied", "short", "detailed"] = "varied"


class ModelConfig(_Strict):
    family: str = "danqing-tiny"        # bundled architecture configs (data/families/<family>/)
    # continue from an existing model (name, diffusers folder or single file) instead of random
    # init; its VAE is kept as it is unless vae.steps / vae.crop_steps train it further
    init_from: str | None = None
    # start the VAE from this diffusers VAE folder instead (e.g. an earlier run's OUTPUT/vae)
    init_vae: str | None = None
    # start the text encoder from this model's (a name, diffusers folder or single file) and keep
    # it frozen: only the UNet trains (a denoiser-only comparison, e.g. against danqing-tiny-flow)
    frozen_text_encoder_from: str | None = None


class VAEConfig(_Strict):
    steps: int = Field(1000, ge=0)           # phase 1: whole images
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    kl_weight: float = Field(1e-6, ge=0)
    crop_steps: int = Field(0, ge=0)         # phase 2: random crops (cheaper steps, more of them)
    crop_size: int = Field(32, ge=16)
    crop_batch_size: int = Field(64, ge=1)
    crop_lr: float = Field(5e-4, gt=0)
    object_weight: float = Field(0.0, ge=0)  # phase 2: extra loss weight on saturated (object) pixels


class UNetConfig(_Strict):
    steps: int = Field(5000, ge=0)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    decay_steps: int = Field(0, ge=0)  # the lr falls linearly to 0 over the last N of `steps` (0: constant)
    weight_decay: float = Field(0.01, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    caption_dropout: float = Field(0.1, ge=0, le=1)
    max_grad_norm: float = Field(1.0, gt=0)


class RunConfig(_Strict):
    output_dir: str = "runs/danqing-tiny"
    seed: int = 0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(500, ge=1)
    sample_every: int = Field(1000, ge=1)
    eval_every: int = Field(1000, ge=1)
    eval_prompts: int = Field(16, ge=0)
    eval_steps: int = Field(20, ge=1)
    num_threads: int = Field(0, ge=0)   # torch CPU threads; 0 = torch's default
    # stop the UNet stage after this many minutes (checkpoint + export as at the last step); 0: all unet.steps
    max_minutes: float = Field(0, ge=0)
    # every N steps also write latest.safetensors: the EMA model, fp16, single file; 0 = never
    export_every: int = Field(0, ge=0)


class BaseTrainConfig(_Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    vae: VAEConfig = VAEConfig()
    unet: UNetConfig = UNetConfig()
    run: RunConfig = RunConfig()


class EditDataConfig(_Strict):
    n_pairs: int = Field(20000, ge=1)   # synthetic edit pairs (danqing.synthetic.edits)
    seed: int = 0
    langs: tuple[Literal["en", "zh"], ...] = ("en", "zh")
    size: int = Field(64, ge=16)


class InstructConfig(_Strict):
    init_from: str = "danqing-tiny"     # the text-to-image model whose UNet gets 4 more input channels (or an instruct model to continue)
    drop_text: float = Field(0.05, ge=0, le=1)   # the paper: 5% no instruction,
    drop_image: float = Field(0.05, ge=0, le=1)  # 5% no picture,
    drop_both: float = Field(0.05, ge=0, le=1)   # 5% neither (for three-branch guidance)
    eval_pairs: int = Field(32, ge=0)    # held-out edits judged at every run.eval_every


class InstructTrainConfig(_Strict):
    data: EditDataConfig = EditDataConfig()
    instruct: InstructConfig = InstructConfig()
    unet: UNetConfig = UNetConfig()
    run: RunConfig = RunConfig()


class ControlDataConfig(_Strict):
    n_images: int = Field(8000, ge=1)   # synthetic training scenes (danqing.synthetic)
    size: int = Field(64, ge=16)
    seed: int = 0
    captions_per_image: int = Field(2, ge=1)
    # "canny" / "lineart": the preprocessor that makes each map of a shapes scene; "mouth": the
    # portrait world's talking frames with their mouth-shape maps (synthetic.portraits_mouth)
    condition: Literal["canny", "lineart", "mouth"] = "canny"
    degrade: bool = True                # also train on slightly blurred/noisy renders (robustness; not "mouth")
    mouth_weight: float = Field(0.0, ge=0)  # "mouth": the loss inside the mouth box weighs 1 + this


class ControlNetConfig(_Strict):
    init_from: str = "danqing-tiny"     # the base model whose UNet encoder the ControlNet copies
    drop_prompt: float = Field(0.5, ge=0, le=1)  # the paper: 50% of prompts replaced by ""
    init_controlnet: str | None = None  # continue from a ControlNet folder (an earlier run's export) instead of from_unet
    eval_maps: int = Field(32, ge=0)    # held-out maps scored (edge F1) at every run.eval_every


class DecoderDataConfig(_Strict):
    # "world:portraits-talking": new pictures of the portrait world every step: a talking_share
    # of talking frames (flat, any pose and openness), the rest portraits in every style;
    # "world:shapes": new training scenes of the shapes world every step (1-3 objects)
    source: Literal["world:portraits-talking", "world:shapes"] = "world:portraits-talking"
    size: int = Field(64, ge=16)
    talking_share: float = Field(0.6, ge=0, le=1)
    mouth_weight: float = Field(10.0, ge=0)   # portraits: the loss inside the mouth box weighs 1 + this
    edge_weight: float = Field(0.0, ge=0)     # a pixel's loss weighs 1 + this x its edge strength (0-1) in the picture


class DecoderConfig(_Strict):
    init_from: str = "danqing-tiny-portraits"  # the checkpoint whose VAE's decoder is fine-tuned
    eval_people: int = Field(12, ge=0)          # portraits: held-out people whose round trip is measured
    eval_scenes: int = Field(200, ge=0)         # shapes: held-out scenes whose round trip the evaluator reads


class DecoderTrainConfig(_Strict):
    data: DecoderDataConfig = DecoderDataConfig()
    decoder: DecoderConfig = DecoderConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the decoder
    run: RunConfig = RunConfig()


class ControlTrainConfig(_Strict):
    data: ControlDataConfig = ControlDataConfig()
    controlnet: ControlNetConfig = ControlNetConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the ControlNet
    run: RunConfig = RunConfig()


class IPAdapterDataConfig(_Strict):
    n_images: int = Field(10000, ge=1)  # synthetic training scenes (danqing.synthetic), each its own image prompt
    size: int = Field(64, ge=16)
    seed: int = 0
    captions_per_image: int = Field(2, ge=1)


class IPAdapterConfig(_Strict):
    init_from: str = "danqing-tiny"             # the base model the adapter is for
    image_encoder: str = "danqing-tiny-clip"    # the CLIP model whose image embedding is the prompt
    init_adapter: str | None = None             # continue from this adapter file (an earlier run's) instead of a new one;
                                                # a base adapter's to_k_ip / to_v_ip also start a "plus" one
    kind: Literal["base", "plus"] = "base"       # "plus": IP-Adapter Plus, a resampler over the encoder's patch tokens
    plus_tokens: int = Field(16, ge=1)           # plus: image tokens (the resampler's queries)
    plus_width: int = Field(64, ge=64, multiple_of=64)  # plus: the resampler's width (64 per head, as the release)
    drop_text: float = Field(0.25, ge=0, le=1)  # share of steps with the empty caption (image-only prompts)
    drop_image: float = Field(0.05, ge=0, le=1)  # ... with the zero image embedding (the unconditional image)
    drop_both: float = Field(0.05, ge=0, le=1)   # ... with neither (classifier-free guidance)
    eval_per_object: int = Field(4, ge=0)        # generations per reference object at every run.eval_every


class IPAdapterTrainConfig(_Strict):
    data: IPAdapterDataConfig = IPAdapterDataConfig()
    ip_adapter: IPAdapterConfig = IPAdapterConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the adapter
    run: RunConfig = RunConfig()


class UnclipConfig(_Strict):
    # the decoder's format: Stable unCLIP (the embedding added to the time embedding; danqing-tiny's
    # text still read) or Kandinsky 2.2 (the embedding as 32 cross-attention tokens and added to the
    # time embedding; no text; danqing-tiny's VAE as its MoVQ)
    format: Literal["stable-unclip", "kandinsky"] = "stable-unclip"
    init_from: str = "danqing-tiny"             # the text-to-image model the decoder starts from (its UNet trains)
    init_decoder: str | None = None             # continue from this Stable unCLIP folder (an earlier run's model/) instead
    image_encoder: str = "danqing-tiny-clip"    # the CLIP model whose image embedding conditions the decoder
    drop_text: float = Field(0.5, ge=0, le=1)   # share of steps with the empty caption (variations have none)
    drop_image: float = Field(0.1, ge=0, le=1)  # ... with the zero class label (the unconditional branch)
    max_noise_level: int = Field(1000, ge=1, le=1000)  # noise augmentation: levels drawn from [0, this)
    vlb_weight: float = Field(1.0, ge=0)        # Kandinsky: the variational bound's weight (trains the variance)
    eval_pictures: int = Field(16, ge=0)        # held-out pictures varied at every run.eval_every


class UnclipTrainConfig(_Strict):
    data: IPAdapterDataConfig = IPAdapterDataConfig()
    unclip: UnclipConfig = UnclipConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the decoder
    run: RunConfig = RunConfig()


class PriorConfig(_Strict):
    clip: str = "danqing-tiny-clip"             # the CLIP model: its text half reads captions, its image half embeds pictures
    num_layers: int = Field(4, ge=1)            # diffusers' PriorTransformer (DALL-E 2's prior; Kandinsky 2.2's layout)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(32, ge=8)
    drop_text: float = Field(0.1, ge=0, le=1)   # share of steps with the empty caption (the prior's CFG)
    eval_prompts: int = Field(64, ge=0)         # held-out captions whose sampled embedding is judged at run.eval_every


class PriorTrainConfig(_Strict):
    data: IPAdapterDataConfig = IPAdapterDataConfig()
    prior: PriorConfig = PriorConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the prior
    run: RunConfig = RunConfig()


class FlowModelConfig(_Strict):
    # the model whose text encoder and VAE the transformer works with (both kept frozen)
    init_from: str = "danqing-tiny"
    # SD3's MMDiT (diffusers' SD3Transformer2DModel) at toy size: 2x2 latent patches, joint attention
    num_layers: int = Field(5, ge=1)
    num_attention_heads: int = Field(4, ge=1)
    attention_head_dim: int = Field(24, ge=8)
    patch_size: int = Field(2, ge=1)
    qk_norm: Literal["rms_norm", "none"] = "rms_norm"  # SD3.5's RMSNorm of queries and keys
    shift: float = Field(1.0, gt=0)            # the sampling schedule's timestep shift (SD3 1024px: 3.0)
    logit_mean: float = 0.0                    # training timesteps: sigma = sigmoid(N(mean, std)),
    logit_std: float = Field(1.0, gt=0)        # SD3's logit-normal sampling (Esser et al. 2024, 3.1)


class FlowTrainConfig(_Strict):
    data: DataConfig = DataConfig()
    flow: FlowModelConfig = FlowModelConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the transformer
    run: RunConfig = RunConfig()


class CascadeModelConfig(_Strict):
    # which stage of the pixel cascade (Imagen / DeepFloyd IF) this run trains: "base" (text ->
    # base_size pixels, with its own T5 text encoder trained beside it) or "upscaler" (4x super-
    # resolution of base_size pictures, conditioned on them upsampled and noised: noise-conditioning
    # augmentation); each writes a diffusers IF folder (IFPipeline / IFSuperResolutionPipeline)
    # "unconditional": the course's project 2, a pixel DDPM with no text (diffusers' UNet2DModel,
    # epsilon MSE, linear betas, EMA, sample grids) at base_size, written as a DDPMPipeline folder
    stage: Literal["base", "upscaler", "unconditional"] = "base"
    base_size: int = Field(32, ge=8)            # stage I's pictures; data.size must be 4x this (IF's ratio)
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int = Field(1, ge=1)
    attention_head_dim: int = Field(16, ge=4)
    norm_num_groups: int = Field(8, ge=1)
    # base: the T5 encoder (transformers' T5EncoderModel) and its word-level tokenizer
    text_width: int = Field(64, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    vlb_weight: float = Field(1.0, ge=0)        # learned variance: L_simple + this * L_vlb (Nichol & Dhariwal 2021)
    # what the UNet predicts: the noise (IF's) or the velocity (Salimans & Ho 2022; the SD x4
    # upscaler's): at high noise a velocity model draws the picture itself, which a super-
    # resolution stage can copy from its input, where an epsilon model's x0 is noise / sqrt(a_t)
    prediction: Literal["epsilon", "v_prediction"] = "epsilon"
    # upscaler: random crops of the 4x pictures per step (it has no attention: any size samples)
    crop_size: int = Field(48, ge=8)
    max_noise_level: int = Field(500, ge=1, le=1000)  # augmentation levels drawn from [0, this)
    eval_steps: int = Field(50, ge=1)           # sampling steps of the in-run evaluation (DDPM, as IF)


class CascadeTrainConfig(_Strict):
    data: DataConfig = DataConfig(size=128)
    cascade: CascadeModelConfig = CascadeModelConfig()
    unet: UNetConfig = UNetConfig()     # optimisation settings (steps, batch, lr, ...) of the stage
    run: RunConfig = RunConfig()


def load_config(path: str | Path, overrides: dict | None = None, model=BaseTrainConfig):
    """Read and validate a TOML training config; ``overrides`` is {"section.key": value}.

    Raises:
        InvalidRequest: unreadable file, TOML syntax, unknown or out-of-range keys (one line).
    """
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidRequest("config", f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise InvalidRequest("config", f"{path}: not valid TOML ({exc})") from None
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        raw.setdefault(section, {})[name] = value
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise InvalidRequest("config", f"{path}: {where}: {err['msg']}") from None


# ---------------------------------------------------------------------------------------------
# Fine-tuning an existing model: LoRA, DreamBooth, textual inversion (danqing.training.finetune)
# ---------------------------------------------------------------------------------------------
class FinetuneModelConfig(_Strict):
    base: str = "danqing-tiny"          # checkpoint name, diffusers folder or single file
    v_prediction: bool | None = None    # None: the model's own prediction type


class FinetuneDataConfig(_Strict):
    # a folder of images with captions: plain (.txt beside each image), kohya ("N_concept/"
    # sub-folders repeated N times) or diffusers ("metadata.jsonl"); or "concept:<name>" for
    # rendered scenes of a novel synthetic shape or colour ("heart", "magenta": danqing.synthetic.concepts);
    # or "world:shapes" / "world:portraits" / "world:mix": training scenes of a synthetic world
    # with English and Chinese captions (what a distillation learns from)
    source: str = "concept:heart"
    n_images: int = Field(20, ge=1)     # concept: scenes to render
    captions_per_image: int = Field(4, ge=1)  # concept: English phrasings per scene
    pair_share: float = Field(1 / 3, ge=0, le=1)  # concept: the share of scenes with a second, ordinary object
    pair_relations: tuple[Literal["left", "right", "above", "below"], ...] = ("left", "right")  # ... and its relations
    resolution: int = Field(64, ge=16)  # buckets hold about resolution^2 pixels
    repeats: int = Field(1, ge=1)       # plain / metadata.jsonl folders (kohya sub-folders carry their own)
    caption_ext: str = ".txt"
    caption_dropout: float = Field(0.0, ge=0, le=1)  # a caption replaced by "" (for CFG)
    shuffle_tags: bool = False          # shuffle comma-separated tags ...
    keep_tokens: int = Field(0, ge=0)   # ... keeping the first N in place
    flip: bool = False                  # random horizontal flip (cached both ways)
    buckets: bool = True                # aspect-ratio bucketing (else centre crops)
    # masked loss (kohya's masked_loss / alpha_mask): pixels inside an image's mask (its alpha
    # channel; the objects of rendered concept scenes) weigh 1 + object_weight; 0 = plain loss
    object_weight: float = Field(0.0, ge=0)
    seed: int = 0


class NetworkConfig(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(8.0, gt=0)
    unet_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # module-name suffixes (peft)
    # false: no UNet adapter (kohya's network_train_text_encoder_only): the text encoder's LoRA
    # and/or the words train, and the empty prompt's prediction stays the base model's
    train_unet: bool = True
    train_text_encoder: bool = False
    text_encoder_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
    text_encoder_lr: float | None = None  # None: the UNet's lr
    # pivotal tuning: these words' input embeddings train too (a word the base model never
    # learnt has only its initial vector); written into the kohya file as A1111's bundle_emb.*
    train_words: tuple[str, ...] = ()
    # pivotal tuning of new words: each word becomes new vectors, one per token of its text and
    # initialised from it (e.g. a captioner's description of a person), bundled the same way;
    # a run takes train_words or word_init, not both
    word_init: dict[str, str] = {}
    word_lr: float = Field(1e-2, gt=0)
    # text-encoder preservation (0: off): the text encoder is held to the base model's hidden
    # states, at this weight, on the captions without the trained words (train_words, word_init)
    # and on preserve_prompts, so that other prompts' words keep their meaning
    te_preserve: float = Field(0.0, ge=0)
    preserve_prompts: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _one_kind_of_words(self) -> "NetworkConfig":
        if self.train_words and self.word_init:
            raise ValueError("network.word_init: give train_words or word_init, not both")
        if self.te_preserve and not self.train_text_encoder:
            raise ValueError("network.te_preserve: preserves the text encoder's LoRA; set train_text_encoder = true")
        return self


class OptimConfig(_Strict):
    steps: int = Field(800, ge=1)
    batch_size: int = Field(4, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_scheduler: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    grad_accum: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0)
    weight_decay: float = Field(1e-2, ge=0)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    noise_offset: float = Field(0.0, ge=0)  # Guttenberg (2023): noise += offset * N(0, 1) per channel
    min_snr_gamma: float | None = Field(None, gt=0)  # Hang et al. (2023); 5 is the paper's value
    seed: int = 0


class PriorConfig(_Strict):
    enabled: bool = True
    # where the prior (class / regularisation) images come from: generated by the base model itself
    # from "concept-class" prompts (the concept scenes with an ordinary shape in its place),
    # "synthetic" prompts (training-split scenes) or one class prompt ("prompt:a square", DreamBooth's,
    # at n_class_images seeds; "unconditional:a person": trained with the empty caption, so the
    # unconditional prediction stays the base's), or a folder of captioned images (kohya's reg_data_dir)
    class_source: str = "concept-class"
    n_class_images: int = Field(40, ge=1)
    prior_loss_weight: float = Field(1.0, ge=0)
    sample_steps: int = Field(20, ge=1)


class EmbeddingConfig(_Strict):
    name: str = "dq-heart"              # the word used in prompts (the embedding's file name)
    init_word: str = "shape"            # initialiser token(s)
    n_vectors: int = Field(2, ge=1, le=75)


class OutputConfig(_Strict):
    output_dir: str = "runs/lora-heart"
    name: str = "heart"
    formats: tuple[Literal["kohya", "diffusers"], ...] = ("kohya", "diffusers")  # LoRA only
    log_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(200, ge=1)
    sample_every: int = Field(200, ge=1)
    sample_prompts: tuple[str, ...] = ()  # default: captions of the first held-out concept scenes
    sample_seed: int = 0
    sample_steps: int = Field(20, ge=1)
    num_threads: int = Field(0, ge=0)    # torch CPU threads; 0 = torch's default


class LoraTrainConfig(_Strict):
    model: FinetuneModelConfig = FinetuneModelConfig()
    data: FinetuneDataConfig = FinetuneDataConfig()
    network: NetworkConfig = NetworkConfig()
    prior: PriorConfig = PriorConfig(enabled=False)  # regularisation images, as kohya's reg_data_dir
    train: OptimConfig = OptimConfig()
    output: OutputConfig = OutputConfig()


class DreamBoothConfig(_Strict):
    train_text_encoder: bool = False
    instance_prompt: str | None = None    # every instance image's caption (e.g. "a dq-sq square"); None: their own
    text_encoder_lr: float | None = None  # None: the UNet's lr


class DreamBoothTrainConfig(_Strict):
    model: FinetuneModelConfig = FinetuneModelConfig()
    data: FinetuneDataConfig = FinetuneDataConfig()
    dreambooth: DreamBoothConfig = DreamBoothConfig()
    train: OptimConfig = OptimConfig(lr=5e-5)
    prior: PriorConfig = PriorConfig()
    output: OutputConfig = OutputConfig(output_dir="runs/dreambooth-heart")


class TextualInversionTrainConfig(_Strict):
    model: FinetuneModelConfig = FinetuneModelConfig()
    data: FinetuneDataConfig = FinetuneDataConfig()
    embedding: EmbeddingConfig = EmbeddingConfig()
    train: OptimConfig = OptimConfig(lr=5e-3)
    output: OutputConfig = OutputConfig(output_dir="runs/ti-heart")


class DistillConfig(_Strict):
    # "lcm": latent consistency distillation into a LoRA (LCM-LoRA; the LCM sampler); "pcd": phased
    # consistency distillation, one phase per sampling step (DDIM on the Simple schedule)
    method: Literal["lcm", "pcd"] = "lcm"
    guidance: float = Field(7.0, ge=1)             # the teacher's CFG scale (what the student learns to draw at CFG 1)
    solver_steps: int = Field(50, ge=2, le=1000)   # the DDIM solver's steps (the LCM sampler's original_inference_steps)
    huber_c: float = Field(1e-3, gt=0)             # pseudo-Huber loss constant
    timestep_scaling: float = Field(10.0, gt=0)    # boundary scalings, as LCMScheduler
    sample_steps: int = Field(4, ge=1)             # the steps it is made for ("pcd": its phases); sample grids at CFG 1


class DistillDataConfig(FinetuneDataConfig):
    source: str = "world:shapes"
    n_images: int = Field(2000, ge=1)


class DistillOutputConfig(OutputConfig):
    output_dir: str = "runs/distill-danqing-tiny"
    name: str = "danqing-tiny-lcm"
    formats: tuple[Literal["kohya", "diffusers"], ...] = ("kohya",)


class DistillTrainConfig(_Strict):
    """A few-step model by distillation (``danqing.training.distill``)."""

    model: FinetuneModelConfig = FinetuneModelConfig()
    data: DistillDataConfig = DistillDataConfig()
    network: NetworkConfig = NetworkConfig()
    distill: DistillConfig = DistillConfig()
    train: OptimConfig = OptimConfig()
    output: DistillOutputConfig = DistillOutputConfig()


# ``danqing train KIND`` and the server's training jobs: kind -> its config model
FINETUNE_CONFIGS = {"lora": LoraTrainConfig, "dreambooth": DreamBoothTrainConfig,
                    "textual-inversion": TextualInversionTrainConfig, "distill": DistillTrainConfig}
