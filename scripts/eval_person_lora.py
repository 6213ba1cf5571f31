"""Measure a person LoRA in the portrait world (docs/apps.md, "A person LoRA in the portrait world").

For each held-out person named (``synthetic.portraits.person``: an identity no training picture
of the base model shows): 8 rendered pictures in varied clothes, expressions, poses, backgrounds
and styles are written as ``portrait add`` writes a person (``apps.portrait_world``);
``danqing app portrait train`` trains their LoRA (the ``tiny`` recipe unless ``--recipe`` says
otherwise); then 50 new pictures of them (other clothes, backgrounds and styles) are asked for
by caption, with the LoRA and without it, at the same seeds. A picture gives the person's
identity when the portrait reader reads every identity attribute its style shows as theirs.

    .venv/bin/python scripts/eval_person_lora.py --model danqing-tiny-portraits --person Ada,Bai,Chen,Dara
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="the base model (a name, diffusers folder or single file)")
    ap.add_argument("--person", default="Ada", help="held-out people, comma-separated (Ada,Bai,...)")
    ap.add_argument("--pictures", type=int, default=8)
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--recipe", default="tiny")
    ap.add_argument("--prior-images", type=int, default=None, help="[default: the recipe's]")
    ap.add_argument("--steps", type=int, default=None, help="training steps [default: the recipe's]")
    ap.add_argument("--lr", type=float, default=None, help="[default: the recipe's]")
    ap.add_argument("--rank", type=int, default=None, help="[default: the recipe's]")
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--weight", type=float, default=1.0, help="the LoRA's weight")
    ap.add_argument("--styles", type=int, default=0, help="also make this many pictures per portrait-world style "
                                                           "with `portrait make`, with and without the LoRA [default: 0]")
    ap.add_argument("--keep", type=int, default=2, help="with --styles: the top pictures of each run whose reader "
                                                       "score is compared with the rest's [default: 2]")
    ap.add_argument("--api", action="store_true", help="also run the app through its job API (in process): the "
                                                       "LoRA as a train job, --styles pictures per style as portrait jobs")
    ap.add_argument("--home", type=Path, default=None, help="keep the runs here, one folder per person "
                                                            "[default: temporary folders]")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from danqing import Settings, Studio
    from danqing.apps.portrait_world import measure_person_lora, write_world_person
    from danqing.synthetic.portraits import IDENTITY, person

    results = []
    for who in (person(name) for name in args.person.split(",")):
        name = who.name.lower()
        home = (args.home / name) if args.home else Path(tempfile.mkdtemp(prefix=f"person-lora-{name}-"))
        write_world_person(home, name, who, args.pictures)
        cmd = [sys.executable, "-m", "danqing.cli", "--home", str(home), "app", "portrait", "train", name,
               "--recipe", args.recipe, "--base", args.model]
        for flag, value in (("--steps", args.steps), ("--lr", args.lr), ("--rank", args.rank),
                            ("--prior-images", args.prior_images)):
            if value is not None:
                cmd += [flag, str(value)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        out = measure_person_lora(Studio(Settings(home=home)), who, name, model=args.model, n=args.n,
                                  weight=args.weight, cfg_scale=args.cfg, out_dir=home / "outputs")
        for label in ("without", "with"):
            s = out[label]
            print(f"{who.name} {label} the LoRA: identity given in {s['all']:.2f} of {args.n}; "
                  + ", ".join(f"{a} {s[a]}" for a in (*IDENTITY, "style")), flush=True)
        if args.styles:
            out["styles"] = styled(home, who, name, args)
        if args.api:
            out["api"] = through_api(home, who, name, args)
        print(f"run and pictures: {home}", flush=True)
        results.append({"person": who.name, "identity": {a: getattr(who, a) for a in IDENTITY},
                        "recipe": args.recipe, "pictures": args.pictures, "n": args.n, **out})
    if args.out:
        args.out.write_text(json.dumps(results, indent=1), encoding="utf-8")


def styled(home: Path, who, name: str, args) -> dict:
    """`danqing app portrait make` in each portrait-world style, without and with the LoRA (the
    same seeds); per style and each way, the share of pictures that give the person's identity
    and that show the style's background and rendering."""
    from PIL import Image

    from danqing.apps.portrait_people import load_person
    from danqing.apps.portrait_styles import get_style
    from danqing.apps.portrait_world import judge_styled, write_world_styles

    trigger = load_person(home, name).trigger
    out, ranking = {}, []
    for style in write_world_styles(home):
        prompt = get_style(style, home).prompt.replace("{trigger}", trigger)
        for label, lora in (("without", []), ("with", ["--lora", name])):
            folder = home / "made" / style / label
            subprocess.run([sys.executable, "-m", "danqing.cli", "--home", str(home), "app", "portrait", "make", name,
                            "--style", style, "-n", str(args.styles), "--model", args.model, "--seed", "2000",
                            "--out", str(folder), *lora], check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                           stdout=subprocess.DEVNULL)
            files = sorted(folder.glob("*.png"))
            judged = [judge_styled(Image.open(f).convert("RGB"), who, prompt) for f in files]
            for rank, (f, j) in enumerate(zip(files, judged), 1):   # the files are named best first
                with Image.open(f) as im:
                    score = re.search(r"Portrait score: (-?[0-9.]+)", im.info.get("parameters", ""))
                ranking.append({"style": style, "lora": label, "rank": rank, "share": j["share"],
                                "score": float(score.group(1)) if score else None})
            res = {k: round(sum(j[k] for j in judged) / len(judged), 3) for k in ("identity", "look")}
            for a in ("background", "style", "mouth", "clothing", "pose"):
                vals = [j[a] for j in judged if j.get(a) is not None]
                if vals:
                    res[a] = round(sum(vals) / len(vals), 3)
            out.setdefault(style, {})[label] = {"n": len(judged), **res}
            print(f"{who.name} {style} {label} the LoRA: {res}", flush=True)
    out["ranking"] = agreement(ranking, args.keep)
    print(f"{who.name} ranking: {json.dumps({k: v for k, v in out['ranking'].items() if k != 'rows'})}", flush=True)
    return out


def through_api(home: Path, who, name: str, args) -> dict:
    """The same app through its job API (the FastAPI app in process, over HTTP semantics): the
    person's LoRA as a train job with the recipe (``POST /api/v1/train/jobs``), then in each
    portrait-world style a portrait job of ``--styles`` pictures without and with it
    (``POST /api/v1/portrait/jobs``, seeds from 2000), judged as ``styled`` judges them. A base
    model given as a folder is copied into the home's models/checkpoints/: the server names
    models, never paths."""
    from fastapi.testclient import TestClient
    from PIL import Image

    from danqing.apps.portrait_people import load_person
    from danqing.apps.portrait_styles import get_style
    from danqing.apps.portrait_world import judge_styled, write_world_styles
    from danqing.server.app import create_app
    from danqing.settings import ServerSettings, Settings

    import shutil

    base = args.model      # a bundled model or one of the models folder: the server knows its name
    if Path(args.model).is_dir():
        base = Path(args.model).name if Path(args.model).name != "model" else Path(args.model).parent.name
        link = home / "models" / "checkpoints" / base
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists():   # a copy: the server follows no link out of its models folder
            shutil.copytree(args.model, link)
    app = create_app(Settings(home=home, device="cpu", dtype="fp32"), ServerSettings(ui=False, allowed_hosts=("testserver",)))
    out, lora = {}, f"{name}-api"
    trigger = load_person(home, name).trigger
    with TestClient(app) as c:
        r = c.post("/api/v1/train/jobs", json={"person": name, "name": lora, "base": base, "recipe": args.recipe})
        assert r.status_code == 202, r.text
        job = c.get(f"/api/v1/train/jobs/{r.json()['id']}/wait", params={"timeout": 3600}).json()
        assert job["status"] == "done", job
        out["train"] = {"steps": job["step"], "last_loss": job["losses"][-1]["loss"]}
        print(f"{who.name} through the API: train job done, {job['step']} steps", flush=True)
        for style in write_world_styles(home):
            prompt = get_style(style, home).prompt.replace("{trigger}", trigger)
            for label, with_lora in (("without", None), ("with", lora)):
                r = c.post("/api/v1/portrait/jobs", json={"person": name, "style": style, "n": args.styles, "seed": 2000,
                                                          "model": base, "lora": with_lora})
                assert r.status_code == 202, r.text
                done = r.json()
                while done["status"] not in ("done", "failed", "cancelled"):
                    done = c.get(f"/api/v1/jobs/{done['id']}/wait", params={"timeout": 600}).json()
                assert done["status"] == "done", done
                judged = [judge_styled(Image.open(f["path"]).convert("RGB"), who, prompt) for f in done["result"]["files"]]
                res = {k: round(sum(j[k] for j in judged) / len(judged), 3) for k in ("identity", "look")}
                out.setdefault(style, {})[label] = {"n": len(judged), **res}
                print(f"{who.name} through the API, {style} {label} the LoRA: {res}", flush=True)
    return out


def agreement(rows: list[dict], keep: int) -> dict:
    """How the world face backend's similarity (``portrait make``'s ranking score) agrees with
    the portrait reader's share of identity attributes right, over every picture made:
    Spearman's rho; the reader's mean share of each run's (a style, with or without the LoRA)
    top ``keep`` against that of the run's rest; and the same for the whole set ranked at once
    (its top ``keep`` x runs pictures against the rest)."""
    from scipy.stats import spearmanr

    def mean(xs: list[float]) -> float:
        return round(sum(xs) / max(1, len(xs)), 3)

    scored = [r for r in rows if r["score"] is not None]
    rho = spearmanr([r["score"] for r in scored], [r["share"] for r in scored]).statistic
    order = sorted(scored, key=lambda r: -r["score"])      # the whole set ranked, top `keep` per run's worth
    top_all = len({(r["style"], r["lora"]) for r in scored}) * keep
    return {"pictures": len(scored), "rho": round(float(rho), 3), "keep": keep,
            "top_share": mean([r["share"] for r in scored if r["rank"] <= keep]),
            "rest_share": mean([r["share"] for r in scored if r["rank"] > keep]),
            "set_top_share": mean([r["share"] for r in order[:top_all]]),
            "set_rest_share": mean([r["share"] for r in order[top_all:]]), "rows": rows}


if __name__ == "__main__":
    main()
