"""People of the portrait studio: a person's folder under the home (``people/NAME/``), made from
the accepted photos of an ``ingest``, and what later steps read from it.

``people/NAME/`` holds ``train/`` (landmark-aligned face crops and head-and-shoulders crops at
the training size, each with a ``.txt`` caption carrying the trigger word: a folder the LoRA
trainer reads as it is), ``best-face.png`` (the face crop closest to the person's mean identity,
the source of face fusion), ``contact-sheet.png`` and ``person.json`` (trigger word, face
backend, mean embedding, the verdict on every photo). The folder is written atomically.
"""

from __future__ import annotations

import functools
import json
import re
import tomllib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image

from danqing.apps.portrait import IngestReport, contact_sheet
from danqing.errors import InvalidRequest, ModelNotFound
from danqing.faces.backend import FaceBackend, cosine
from danqing.faces.fusion import METHODS, fuse_face, identity_scores, main_face, mean_embedding, top_k
from danqing.faces.geometry import FACE, HEAD_AND_SHOULDERS, aligned_crop
from danqing.files import atomic_save_dir
from danqing.models.names import check_new_name, within

PEOPLE = "people"
CROPS = {"face": FACE, "head": HEAD_AND_SHOULDERS}


@functools.lru_cache(maxsize=None)
def caption_table() -> dict:
    """``data/apps/portrait.toml``'s ``[captions]``: templates and the appearance words."""
    text = resources.files("danqing").joinpath("data/apps/portrait.toml").read_text(encoding="utf-8")
    return tomllib.loads(text)["captions"]


def clean_caption(text: str, table: dict | None = None) -> str:
    """A captioner's text without the person's looks. The text is cut into clauses (at commas,
    "and", "with"); in each, everything up to its last appearance word goes ("long blonde hair
    wearing a scarf" -> "wearing a scarf"), then words for "a person" ("a woman") are removed.
    What is left (clothes, pose, place, light) is kept."""
    table = table or caption_table()
    appearance, person = set(table["appearance"]), table["person"]
    who = re.compile(r"\b(?:(?:a|an|the)\s+)?(?:" + "|".join(map(re.escape, person)) + r")\b")
    kept = []
    for clause in re.split(r",|\bwith\b|\band\b", text.lower()):
        words = clause.split()
        last = max((i for i, w in enumerate(words) if re.sub(r"[^a-z]", "", w) in appearance), default=-1)
        clause = re.sub(r"\s+", " ", who.sub("", " ".join(words[last + 1:]))).strip(" .")
        clause = re.sub(r"(^|\s+)(of|a|an|the)$", "", clause)  # "a close up of [a woman]" -> "a close up"
        if clause:
            kept.append(clause)
    return ", ".join(kept)


class TemplateCaptioner:
    """No model: every crop gets its template caption only."""

    name = "template"

    def caption(self, image: Image.Image) -> str:
        return ""


class TransformersCaptioner:
    """A local transformers image-to-text model folder (BLIP, GIT, ...: what
    ``AutoModelForImageTextToText`` loads) that the user provides; nothing is downloaded.

    Raises:
        InvalidRequest: ``folder`` is not a folder.
        ModelNotFound: the folder holds no model transformers can load.
    """

    def __init__(self, folder: str | Path, *, max_new_tokens: int = 30):
        folder = Path(folder)
        if not folder.is_dir():
            raise InvalidRequest("captioner", f"{folder}: not a folder; give a local transformers image-to-text "
                                              f"model folder (BLIP, GIT); nothing is downloaded")
        from transformers import AutoModelForImageTextToText, AutoProcessor  # lazy: heavy

        try:
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.model = AutoModelForImageTextToText.from_pretrained(folder, local_files_only=True).eval()
        except (OSError, ValueError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ModelNotFound(f"{folder}: not a transformers image-to-text model ({first})") from None
        self.name, self.max_new_tokens = f"transformers:{folder.name}", max_new_tokens

    def caption(self, image: Image.Image) -> str:
        import torch

        with torch.no_grad():
            inputs = self.processor(images=image, return_tensors="pt")
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens)
        return self.processor.batch_decode(out, skip_special_tokens=True)[0].strip()


def caption_for(kind: str, trigger: str, generated: str = "") -> str:
    """The caption of a ``kind`` ("face" / "head") crop: its template with the trigger word, then
    the captioner's cleaned words when there are any."""
    base = caption_table()[kind].format(trigger=trigger)
    extra = clean_caption(generated) if generated else ""
    return f"{base}, {extra}" if extra else base


def default_trigger(name: str) -> str:
    """A rare word for the person (the class word is left to the captions): ``dq_NAME``."""
    return f"dq_{name.lower()}"


def prepare_person(home: str | Path, name: str, report: IngestReport, *, trigger: str | None = None,
                   size: int = 512, captioner=None, overwrite: bool = False) -> Path:
    """Write ``people/NAME/`` from the accepted photos of ``report`` (see the module).

    Args:
        home: danqing's home folder.
        name: the person's name (letters, digits, ``-``, ``_``).
        report: ``ingest``'s report on the person's photos.
        trigger: the word that stands for the person in captions and prompts (default ``dq_NAME``).
        size: the side of the training crops (the course trains at 512).
        captioner: a ``TemplateCaptioner`` (default) or ``TransformersCaptioner``.
        overwrite: replace an existing person of that name.

    Raises:
        InvalidRequest: a bad name or trigger, a bad size, or fewer accepted photos than the
            policy's ``min_photos`` (the first reasons are named).
        FileExistsError: the person exists and ``overwrite`` is false.
    """
    check_new_name(name, "name", "person")
    trigger = trigger or default_trigger(name)
    if not re.fullmatch(r"[\w\-]{1,64}", trigger):
        raise InvalidRequest("trigger", f"{trigger!r}: one word of letters, digits, '-' or '_'")
    if not 64 <= size <= 2048 or size % 8:
        raise InvalidRequest("size", f"{size}: a multiple of 8 between 64 and 2048")
    accepted, need = report.accepted, report.policy.min_photos
    if len(accepted) < need:
        why = "; ".join(f"{v.path.name}: {v.reason}" for v in report.rejected[:3])
        raise InvalidRequest("photos", f"{len(accepted)} usable photo(s) of {len(report.verdicts)}; at least {need} "
                                       f"are needed" + (f" ({why}{'; ...' if len(report.rejected) > 3 else ''})" if why else ""))
    folder = Path(home) / PEOPLE / name
    if folder.exists() and not overwrite:
        raise FileExistsError(f"person {name!r} exists ({folder}); choose another name or pass --replace")
    captioner = captioner or TemplateCaptioner()
    identity = mean_embedding([v.embedding for v in accepted])
    similarity = [cosine(v.embedding, identity) for v in accepted]
    # the source of face fusion: the most typical of the near-frontal faces
    best = max(range(len(accepted)), key=lambda i: (abs(accepted[i].yaw) < 0.25, similarity[i]))
    sheet = contact_sheet(report)

    def write(tmp: Path) -> None:
        (tmp / "train").mkdir()
        rows = []
        for i, v in enumerate(accepted):
            for kind, framing in CROPS.items():
                crop = Image.fromarray(aligned_crop(v.image, v.face, size, framing))
                stem = f"{i + 1:03d}-{kind}"
                crop.save(tmp / "train" / f"{stem}.png")
                (tmp / "train" / f"{stem}.txt").write_text(caption_for(kind, trigger, captioner.caption(crop)) + "\n",
                                                            encoding="utf-8")
                if kind == "face" and i == best:
                    crop.save(tmp / "best-face.png")
            rows.append({"photo": v.path.name, "crops": f"{i + 1:03d}", "face_px": round(v.face.side),
                         "sharpness": round(v.sharpness, 2), "yaw": round(v.yaw, 3),
                         "similarity": round(similarity[i], 4)})
        sheet.save(tmp / "contact-sheet.png")
        info = {"name": name, "trigger": trigger, "size": size, "face_backend": report.backend,
                "captioner": captioner.name, "best_photo": accepted[best].path.name,
                "identity": [round(float(x), 6) for x in identity], "accepted": rows,
                "rejected": [{"photo": v.path.name, "code": v.code, "reason": v.reason} for v in report.rejected]}
        (tmp / "person.json").write_text(json.dumps(info, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")

    return atomic_save_dir(folder, write, overwrite=overwrite)


@dataclass(frozen=True)
class Person:
    """A prepared person: their folder, trigger word, mean identity (128,) and ``person.json``."""

    name: str
    folder: Path
    trigger: str
    identity: np.ndarray
    info: dict

    @property
    def best_face(self) -> Path:
        return self.folder / "best-face.png"


def backend_of(person: Person) -> str:
    """The name of the face backend that measured ``person``'s identity (``person.json``'s
    ``face_backend``; "dlib" for people added before it was written down)."""
    return str(person.info.get("face_backend") or "dlib").split()[0]


def people(home: str | Path) -> list[str]:
    """The names of the prepared people under ``home/people/`` (folders with a person.json)."""
    root = Path(home) / PEOPLE
    if not root.is_dir():
        return []
    return sorted(p.name for p in within(root.iterdir(), root) if (p / "person.json").is_file())


def load_person(home: str | Path, name: object) -> Person:
    """The person called ``name``, looked up among ``people(home)`` by name only.

    Raises:
        InvalidRequest: no such person (the existing ones are listed).
    """
    names = people(home)
    if not isinstance(name, str) or name not in names:
        shown = str(name)[:120]
        raise InvalidRequest("person", f"unknown person {shown!r}; add one with `danqing app portrait add NAME "
                                       f"PHOTOS...`; people: {', '.join(names) or 'none'}")
    folder = Path(home) / PEOPLE / name
    info = json.loads((folder / "person.json").read_text(encoding="utf-8"))
    return Person(name, folder, info["trigger"], np.asarray(info["identity"], np.float32), info)


@dataclass
class Ranked:
    """One kept picture: its index among the inputs, the (fused) picture, its identity score
    (cosine similarity to the person's mean embedding; None: no face found) and whether a
    face was fused in."""

    index: int
    image: np.ndarray
    score: float | None
    fused: bool

    def metadata(self, rank: int, total: int, backend: FaceBackend) -> dict[str, str]:
        """Infotext fields for the kept picture."""
        out = {"Portrait rank": f"{rank}/{total}", "Face backend": backend.name}
        if self.score is not None:
            out["Portrait score"] = f"{self.score:.4f}"
        return out


def fuse_and_rank(pictures: list[np.ndarray], person: Person, backend: FaceBackend, *, keep: int,
                  fuse: float | None = None, method: str = "seamless") -> list[Ranked]:
    """Fuse the person's best face into each picture (when ``fuse`` is a strength), score every
    picture by identity and keep the ``keep`` best, best first.

    Raises:
        ModelNotFound: ``fuse`` is asked and no face is found in the person's best-face.png.
    """
    if fuse is not None and not 0.0 <= fuse <= 1.0:
        raise InvalidRequest("fuse", f"strength must be between 0 and 1, got {fuse}")
    if method not in METHODS:
        raise InvalidRequest("fuse_method", f"unknown fusion method {method!r}; choose one of: {', '.join(METHODS)}")
    measured = backend_of(person)
    if backend.name != measured:
        raise InvalidRequest("face_backend", f"{person.name}'s identity was measured with the {measured} face backend, "
                                             f"and the {backend.name} backend's embeddings cannot be compared with it; "
                                             f"rank with --backend {measured}")
    out = [np.asarray(p)[..., :3] for p in pictures]
    fused = [False] * len(out)
    if fuse is not None and fuse > 0:
        source = np.asarray(Image.open(person.best_face).convert("RGB"))
        source_face = main_face(backend.detect(source))
        if source_face is None:
            raise ModelNotFound(f"{person.best_face}: the {backend.name} backend finds no face in it")
        for i, pic in enumerate(out):
            face = main_face(backend.detect(pic))
            if face is not None:
                out[i], fused[i] = fuse_face(pic, face, source, source_face, strength=fuse, method=method).image, True
    scores = identity_scores(out, backend, person.identity)
    return [Ranked(i, out[i], scores[i], fused[i]) for i in top_k(scores, keep)]
