"""The comic's job API: a named project's draft (the contact sheet), a re-rolled panel whose seed
is kept, the render (pages, PDF, CBZ) served as files of the job and by name from the project;
bad storyboards, names and files answered 4xx JSON, nothing queued."""

from __future__ import annotations

import io
import re
import zipfile

import pytest
from PIL import Image
from server_helpers import make_app

# two small panels, few steps: the API's behaviour, not the pictures
STORY = '''
title = "API"
steps = 3
seed = 7
hires_scale = 1
sampler = "Euler"

[characters.heart]
trigger = "a red heart"

[[panels]]
scene = "{heart} left of a blue circle"
caption = "one"

[[panels]]
scene = "{heart} right of a green square"
'''


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    with TestClient(make_app(tmp_path_factory.mktemp("comic-api"))) as c:
        yield c


def run(client, **body) -> dict:
    r = client.post("/api/v1/comic/jobs", json=body)
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["kind"] == "comic"
    done = client.get(f"/api/v1/jobs/{job['id']}/wait", params={"timeout": 300}).json()
    assert done["status"] == "done", done
    return done


def test_draft_reroll_render_and_the_files_by_name(client):
    done = run(client, project="heart-day", storyboard=STORY, action="draft")
    (sheet,) = done["result"]["files"]
    assert sheet["name"] == "contact-sheet.png" and done["result"]["seeds"] == [7, 8]
    by_job = client.get(sheet["url"])
    by_name = client.get("/api/v1/comic/projects/heart-day/files/contact-sheet.png")
    assert by_job.status_code == by_name.status_code == 200 and by_job.content == by_name.content
    assert Image.open(io.BytesIO(by_name.content)).size[0] > 2 * 64
    before = client.get("/api/v1/comic/projects/heart-day/files/draft/panel-02.png").content

    done = run(client, project="heart-day", action="reroll", panel=2)  # the project's own storyboard
    assert done["result"]["seeds"] == [7, 1008]
    assert client.get("/api/v1/comic/projects/heart-day/files/draft/panel-02.png").content != before

    done = run(client, project="heart-day", action="render")
    assert [f["name"] for f in done["result"]["files"]] == ["page-1.png", "comic.pdf", "comic.cbz"]
    pdf = client.get("/api/v1/comic/projects/heart-day/files/comic.pdf")
    assert pdf.headers["content-type"] == "application/pdf" and pdf.content.startswith(b"%PDF")
    cbz = client.get(done["result"]["files"][2]["url"])
    with zipfile.ZipFile(io.BytesIO(cbz.content)) as z:
        assert z.namelist() == ["page-001.png"]
    project = client.get("/api/v1/comic/projects/heart-day").json()
    assert project["seeds"] == [7, 1008] and project["prompts"][0] == "a red heart left of a blue circle"
    assert {"storyboard.toml", "project.json", "final/panel-01.png"} <= {f["name"] for f in project["files"]}
    assert client.get("/api/v1/comic/projects").json() == ["heart-day"]


@pytest.mark.parametrize("body, field, words", [
    ({"storyboard": 'title = "x"\n[[panels]]\nscene = \n'}, "storyboard", "not valid TOML: .*line 3"),
    ({"storyboard": '[[panels]]\nscene = "{bob} waves"\n'}, "storyboard", "unknown character 'bob'"),
    ({"storyboard": '[[panels]]\nscene = "a cat <lora:nope:1>"\n'}, "storyboard.panels.0.prompt", "unknown LoRA 'nope'"),
    ({"storyboard": 'steps = 999\n[[panels]]\nscene = "x"\n'}, "storyboard.panels.0", "steps: .*between 1 and 150"),
    ({"storyboard": 'hires_scale = 1\n[[panels]]\nscene = "x"\noverrides = { init_image = "/etc/passwd" }\n'},
     "storyboard.panels.0.init_image", "paths are not accepted"),
    ({"storyboard": 'expand = "lm:/tmp"\n[[panels]]\nscene = "x"\n'}, "storyboard.expand", "names only"),
    ({"storyboard": '[[panels]]\nscene = "x"\n', "action": "reroll"}, "panel", "reroll needs the panel"),
    ({"storyboard": '[[panels]]\nscene = "x"\n', "action": "reroll", "panel": 3}, "panel", "panels 1-1"),
    ({"project": "../up", "storyboard": '[[panels]]\nscene = "x"\n'}, "project", "not a usable comic project name"),
    ({"project": "never-made"}, "storyboard", "no comic project 'never-made' yet"),
])
def test_bad_comic_jobs_are_one_line_and_queue_nothing(client, body, field, words):
    before = len(client.get("/api/v1/history").json()["jobs"])
    r = client.post("/api/v1/comic/jobs", json={"project": "bad", **body})
    assert r.status_code == 422, r.text
    err = r.json()
    assert err["field"] == field, err
    assert re.search(words, err["detail"]), err
    assert len(client.get("/api/v1/history").json()["jobs"]) == before


def test_files_are_named_never_paths(client):
    for url in ("/api/v1/comic/projects/nope/files/page-1.png", "/api/v1/comic/projects/nope",
                "/api/v1/comic/projects/heart-day/files/../../danqing.sqlite3",
                "/api/v1/comic/projects/heart-day/files/%2Fetc%2Fpasswd"):
        r = client.get(url)
        assert r.status_code in (404, 422) and "application/json" in r.headers["content-type"], (url, r.text)
