"""The portrait studio's third step: a person LoRA on ``people/NAME/train`` with the course's
recipe, as the config of the LoRA trainer (``danqing train lora``'s, ``training.finetune``).

The course (FaceChain's defaults): rank 32 on the UNet and the text encoder, the crops' own size
(512), batch 1, lr 1e-4 with a cosine schedule, about 200 steps per training picture. On a CPU
that is hours for ten photos, so a second recipe trains a quarter of the steps at twice the
rate. A third, ``tiny``, is for danqing's own 64-pixel models: 100 steps per picture at lr
1e-3 on the text encoder's LoRA and the trigger's embedding, the UNet untouched, with a masked
loss on the person; the trigger trains as new vectors that start from the person's description
(person.json's ``description``: a captioner's words for their look) where there is one. Any recipe can add regularisation pictures trained with the empty caption
(``prior_images``, ``person_lora_config``). The recipes are
data (``RECIPES``); a request may override steps, rate, batch, size, rank, the text encoder and
the regularisation pictures, the rest comes from the recipe.

    danqing app portrait train anna                  # the course's recipe
    danqing app portrait train anna --recipe cpu --steps 200
    danqing app portrait train ada --recipe tiny --base danqing-tiny-portraits
"""

from __future__ import annotations

from pathlib import Path

from danqing.apps.portrait_people import Person
from danqing.errors import InvalidRequest

# recipe -> the LoRA trainer's settings; steps_per_image x the pictures in train/ = the steps;
# prior_images: regularisation pictures the base model draws from PRIOR_PROMPT, trained with the
# empty caption (0: none; see person_lora_config)
RECIPES: dict[str, dict] = {
    "course": {"rank": 32, "train_text_encoder": True, "lr": 1e-4, "lr_scheduler": "cosine", "batch_size": 1,
               "steps_per_image": 200, "prior_images": 0},
    "cpu": {"rank": 32, "train_text_encoder": True, "lr": 2e-4, "lr_scheduler": "cosine", "batch_size": 1,
            "steps_per_image": 50, "prior_images": 0},
    # danqing's own 64-px models (danqing-tiny-portraits), docs/apps.md: the text encoder's LoRA
    # and the trigger's own embedding train (pivotal tuning), the UNet does not: a UNet adapter
    # draws the person for the empty prompt too, and CFG then steps away from their small
    # features (the eye colour); the loss weighs the person's pixels (the pictures' alpha
    # channel, where they have one) face_weight times more; with a description, the trigger's
    # vectors start from it and train at word_lr
    "tiny": {"rank": 32, "train_unet": False, "train_text_encoder": True, "train_words": True, "face_weight": 4.0,
             "word_lr": 2e-3, "lr": 1e-3, "lr_scheduler": "cosine", "batch_size": 1, "steps_per_image": 100,
             "prior_images": 0},
}
OVERRIDES = ("steps", "lr", "batch_size", "resolution", "rank", "train_text_encoder", "prior_images")
PRIOR_PROMPT = "a photo of a person, head and shoulders"   # the "head" crops' template without the trigger
MAX_STEPS = 20_000
MAX_PRIOR_IMAGES = 1000


def training_pictures(person: Person) -> list[Path]:
    """The person's training pictures (the crops ``portrait add`` wrote, each with its caption)."""
    return sorted(p for p in (person.folder / "train").glob("*.png") if p.with_suffix(".txt").is_file())


def _words(person: Person, recipe: dict) -> dict:
    """How the trigger trains in a recipe with ``train_words``: as new vectors that start from
    the person's description (person.json's ``description``, a captioner's words for their look)
    where there is one, else as the trigger's own token rows."""
    if not recipe.get("train_words"):
        return {"train_words": []}
    if person.info.get("description"):
        return {"word_init": {person.trigger: person.info["description"]}, "word_lr": recipe.get("word_lr", 1e-2)}
    return {"train_words": [person.trigger]}


def person_lora_config(person: Person, *, name: str, base: str, output_dir: str | Path, recipe: str = "course",
                       overrides: dict | None = None, sample_every: int | None = None, sample_steps: int = 20,
                       checkpoints: int = 4) -> dict:
    """The raw config (``training.config.LoraTrainConfig``) of a person LoRA.

    Args:
        person: a prepared person (``portrait_people.load_person``).
        name: the LoRA's name (``models/lora/NAME.safetensors``).
        base: the checkpoint to train on.
        output_dir: the run folder (checkpoints, samples, the result).
        recipe: a key of ``RECIPES``.
        overrides: values of ``OVERRIDES`` that replace the recipe's (None values are ignored).
        sample_every: a sample grid every N steps (default: at each checkpoint).
        sample_steps: sampling steps of the grids.
        checkpoints: how many resumable checkpoints the run writes (evenly spaced).

    Raises:
        InvalidRequest: an unknown recipe or override, no training pictures, too many steps.
    """
    if recipe not in RECIPES:
        raise InvalidRequest("recipe", f"unknown recipe {str(recipe)[:40]!r}; recipes: {', '.join(RECIPES)}")
    extra = sorted(set(overrides or {}) - set(OVERRIDES))
    if extra:
        raise InvalidRequest(extra[0], f"a person LoRA's recipe does not take {extra[0]}; it takes {', '.join(OVERRIDES)}")
    pictures = training_pictures(person)
    if not pictures:
        raise InvalidRequest("person", f"person {person.name!r} has no training pictures in {person.folder / 'train'}; "
                                       f"add them again with `danqing app portrait add`")
    r = dict(RECIPES[recipe], resolution=int(person.info.get("size", 512)))
    r["steps"] = len(pictures) * r.pop("steps_per_image")
    r.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not 1 <= r["steps"] <= MAX_STEPS:
        raise InvalidRequest("steps", f"{r['steps']}: between 1 and {MAX_STEPS}")
    every = max(1, -(-r["steps"] // max(1, checkpoints)))
    if not 0 <= r["prior_images"] <= MAX_PRIOR_IMAGES:
        raise InvalidRequest("prior_images", f"{r['prior_images']}: between 0 and {MAX_PRIOR_IMAGES}")
    captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in pictures[:2]]
    # The LoRA changes the UNet for every prompt, the empty one included. Trained on the person
    # alone, it draws them for the empty prompt too, and CFG, which steps away from that
    # prediction, then steps away from the person. Pictures of anyone, trained with the empty
    # caption, keep the unconditional prediction the base model's.
    prior = {"prior": {"enabled": True, "class_source": f"unconditional:{PRIOR_PROMPT}",
                       "n_class_images": r["prior_images"], "sample_steps": sample_steps}} if r["prior_images"] else {}
    return {"model": {"base": base}, **prior,
            "data": {"source": str(person.folder / "train"), "resolution": r["resolution"],
                     "object_weight": r.get("face_weight", 0.0)},
            "network": {"rank": r["rank"], "alpha": float(r["rank"]), "train_text_encoder": r["train_text_encoder"],
                        "train_unet": r.get("train_unet", True),
                        **({"te_preserve": r["te_preserve"]} if r.get("te_preserve") else {}), **_words(person, r)},
            "train": {"steps": r["steps"], "batch_size": r["batch_size"], "lr": r["lr"],
                      "lr_scheduler": r["lr_scheduler"]},
            "output": {"output_dir": str(output_dir), "name": name, "formats": ["kohya"], "log_every": 10,
                       "checkpoint_every": every, "sample_every": sample_every or every,
                       "sample_prompts": captions, "sample_steps": sample_steps}}
