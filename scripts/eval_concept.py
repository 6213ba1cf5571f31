"""Measure a taught concept (docs/training.md): the evaluator's score on held-out
prompts with the concept, and on the ordinary held-out prompts, for the base model and with a
LoRA, an embedding or a fine-tuned checkpoint.

    python scripts/eval_concept.py --lora runs/lora-heart/heart.safetensors
    python scripts/eval_concept.py --checkpoint runs/dreambooth-heart/model --class-prompts
    python scripts/eval_concept.py --embedding runs/ti-heart/dq-heart.safetensors --word dq-heart
    python scripts/eval_concept.py --concept magenta --embedding runs/ti-magenta/dq-magenta.safetensors

Prints JSON: {"concept": {...}, "ordinary": {...}, "ordinary_strict": {...}, "class": {...}} for
base and the customised model ("ordinary_strict" also recognises the concept on ordinary prompts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--base", default="danqing-tiny")
    ap.add_argument("--lora", type=Path)
    ap.add_argument("--lora-weight", type=float, default=1.0)
    ap.add_argument("--embedding", type=Path)
    ap.add_argument("--word", default=None, help="the concept's word in prompts (default: the shape, or the embedding's name)")
    ap.add_argument("--checkpoint", type=Path)
    ap.add_argument("--concept", "--shape", dest="shape", default="heart", help="the novel shape or colour")
    ap.add_argument("--n-concept", type=int, default=50)
    ap.add_argument("--n-ordinary", type=int, default=100)
    ap.add_argument("--class-prompts", action="store_true", help="also score DreamBooth's class prompts")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-base", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from danqing import GenerationRequest, Settings, Studio
    from danqing.synthetic.captions import caption
    from danqing.synthetic.concepts import class_scenes, concept_scenes
    from danqing.synthetic.evaluate import score, summarise
    from danqing.synthetic.scenes import eval_scenes

    root = Path(tempfile.mkdtemp(prefix="dq-concept-"))
    for sub in ("checkpoints", "lora", "embeddings"):
        (root / sub).mkdir()
    model = args.base
    tag, word = "", args.word or args.shape
    if args.lora:
        shutil.copy(args.lora, root / "lora" / args.lora.name)
        tag = f" <lora:{args.lora.stem}:{args.lora_weight:g}>"
    if args.embedding:
        shutil.copy(args.embedding, root / "embeddings" / args.embedding.name)
        word = args.word or args.embedding.stem
    if args.checkpoint:
        shutil.copytree(args.checkpoint, root / "checkpoints" / args.checkpoint.name)
    studio = Studio(Settings(home=root / "home", models_dir=root, device="cpu", dtype="fp32"))

    def run(scenes, model_name: str, suffix: str, replace_word: bool, strict: bool = False) -> dict | tuple[dict, dict]:
        scores, strict_scores = [], []
        for i, s in enumerate(scenes):
            prompt = caption(s)
            spec = s.spec
            if replace_word:
                prompt = prompt.replace(args.shape, word)
            req = GenerationRequest.create(prompt=prompt + suffix, model=model_name, steps=args.steps, seed=1000 + i,
                                           width=64, height=64, sampler="DPM++ 2M", cfg_scale=7)
            image = studio.generate(req).images[0]
            scores.append(score(image, spec))
            strict_scores.append(score(image, spec, also=(args.shape,)))
        return (summarise(scores), summarise(strict_scores)) if strict else summarise(scores)

    concept = concept_scenes(args.n_concept, concept=args.shape, split="eval")
    ordinary = eval_scenes(args.n_ordinary)
    classes = class_scenes(concept, seed=1) if args.class_prompts else []
    custom_model = args.checkpoint.name if args.checkpoint else model
    out: dict = {}
    t = time.perf_counter()
    for label, mdl, suffix in (("base", model, ""), ("custom", custom_model, tag)):
        if label == "base" and args.skip_base:
            continue
        ordinary_scores, strict = run(ordinary, mdl, suffix, False, strict=True)
        # "ordinary_strict": the concept is recognised there too, so drawing it where an
        # ordinary shape or colour was asked for counts as wrong
        out[label] = {"concept": run(concept, mdl, suffix, True), "ordinary": ordinary_scores,
                      "ordinary_strict": strict}
        if classes:
            out[label]["class"] = run(classes, mdl, suffix, False)
    out["seconds"] = round(time.perf_counter() - t, 1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
