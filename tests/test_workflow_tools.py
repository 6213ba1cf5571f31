"""Workflow tools (docs/apps.md): A1111's range syntax, styles.csv, wildcards and dynamic prompts,
the X/Y/Z plot (grids, cells that re-create themselves), prompts from file; the CLI's and the
A1111 API's shells, each bad input one line."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import need_module
from PIL import Image

from danqing.apps.prompting import Prompting, expand_request
from danqing.apps.prompts_file import parse_line, plan_lines
from danqing.apps.xyz import (NOTHING, a1111_axes, draw_grid, find_axis, make_axis, parse_axis_option, parse_values,
                              plan_xyz, run_xyz)
from danqing.cli import main
from danqing.conditioning.styles import Style, apply_styles, read_styles, write_styles
from danqing.conditioning.wildcards import resolve_dynamic
from danqing.errors import InvalidRequest
from danqing.outputs.metadata import request_from_infotext
from danqing.outputs.store import read_infotext
from danqing.request import GenerationRequest

TINY = dict(model="tiny-sd1", width=64, height=64)

# A styles.csv byte for byte as A1111 (modules/styles.py: csv.DictWriter, utf-8-sig) writes it:
# a byte-order mark, the header, \r\n line ends, fields with a comma or a quote quoted.
A1111_STYLES = ('\ufeffname,prompt,negative_prompt\r\n'
                'warm,"{prompt}, warm light, golden hour","cold, blue"\r\n'
                'sketch,pencil sketch,\r\n'
                '"quote ""q""",masterpiece,\r\n').encode("utf-8")


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


@pytest.fixture()
def cli(models_dir, tmp_path, studio, monkeypatch):
    """The CLI over the session's Studio (the same models folder): the shells run as they do, without
    loading the models again for every command (test_cli.py covers a CLI with its own Studio)."""
    import danqing.cli.common
    import danqing.cli.workflow

    for module in (danqing.cli.common, danqing.cli.workflow):
        monkeypatch.setattr(module, "make_studio", lambda settings: studio)

    def call(capsys, *args):
        return run(capsys, "--home", str(tmp_path), "--models-dir", str(models_dir), "--device", "cpu", *args)
    return call


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image).convert("RGB") if not isinstance(image, Image.Image) else image.convert("RGB"))


# -- A1111's range syntax ------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, want", [
    ("1-5", int, [1, 2, 3, 4, 5]),
    ("1-10 (+2)", int, [1, 3, 5, 7, 9]),
    ("10-1 (-3)", int, [10, 7, 4]),  # A1111: range(start, end + 1, step), so a falling range stops early
    ("1-10 [3]", int, [1, 5, 10]),  # int() of linspace(1, 10, 3) = 1, 5.5, 10
    ("5, 7-9, 12", int, [5, 7, 8, 9, 12]),
    ("0.2-1 [5]", float, [0.2, 0.4, 0.6, 0.8, 1.0]),
    ("1-2 (+0.5)", float, [1.0, 1.5, 2.0]),
    ("7.5, 3", float, [7.5, 3.0]),
    ('red, "blue, dark", green', str, ["red", "blue, dark", "green"]),  # csv: quoted items keep commas
])
def test_range_syntax_expands_as_a1111(text, kind, want):
    assert parse_values(text, kind) == pytest.approx(want) if kind is float else parse_values(text, kind) == want


def test_axis_indices_are_a1111s():
    txt = [a.label for a in a1111_axes(img2img=False)]
    img = [a.label for a in a1111_axes(img2img=True)]
    # positions A1111 1.10 clients send (x_type 1 = Seed, 4 = Steps, 6 = CFG Scale, 7 = Prompt S/R)
    assert (txt[0], txt[1], txt[4], txt[6], txt[7], txt[9], txt[11], txt[17], txt[42]) == (
        "Nothing", "Seed", "Steps", "CFG Scale", "Prompt S/R", "Sampler", "Checkpoint name", "Schedule type", "Size")
    assert (img[5], img[6], img[9], img[10]) == ("CFG Scale", "Image CFG Scale", "Sampler", "Checkpoint name")
    assert len(txt) == 43 and len(img) == 42 and img[-1] == "Size"  # txt2img has 4 own axes, img2img 3


# -- styles ---------------------------------------------------------------------------------------
def test_a1111_styles_csv_is_read_applied_and_written_back_identically(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_bytes(A1111_STYLES)
    styles = read_styles(path)
    assert list(styles) == ["warm", "sketch", 'quote "q"']
    # {prompt} substitutes; without it the style is appended with ", " (negative likewise)
    assert apply_styles("a cat", "ugly", ["warm"], styles) == ("a cat, warm light, golden hour", "ugly, cold, blue")
    assert apply_styles("a cat", "", ["sketch", "warm"], styles) == ("a cat, pencil sketch, warm light, golden hour",
                                                                     "cold, blue")
    assert apply_styles("", "", ["sketch"], styles) == ("pencil sketch", "")
    out = tmp_path / "again.csv"
    write_styles(out, styles)
    assert out.read_bytes() == A1111_STYLES
    write_styles(out, {**styles, "new": Style("new", "x")})
    assert list(read_styles(out)) == ["warm", "sketch", 'quote "q"', "new"]


def test_unknown_style_lists_the_known_ones(tmp_path):
    (tmp_path / "styles.csv").write_bytes(A1111_STYLES)
    with pytest.raises(InvalidRequest, match=r"unknown style 'nope'; known styles: warm, sketch, quote \"q\""):
        expand_request(GenerationRequest.create(prompt="a"), Prompting.at(tmp_path), ["nope"])


# -- wildcards and dynamic prompts ----------------------------------------------------------------
@pytest.fixture()
def wild_home(tmp_path):
    w = tmp_path / "wildcards"
    (w / "scene").mkdir(parents=True)
    (w / "color.txt").write_text("red\nblue\ngreen\n# a comment\n\nyellow\norange\n")
    (w / "scene" / "shape.txt").write_text("circle\n__color__ square\n{small|large} triangle\n")
    return tmp_path


def test_wildcards_resolve_from_the_seed(wild_home):
    template = "a __color__ {circle|square|star} and {2$$ and $$__scene/shape__|a moon|a sun}, {[cat|dog]|bird}"
    folder = wild_home / "wildcards"
    drawn = {seed: resolve_dynamic(template, seed, folder) for seed in range(12)}
    assert all(resolve_dynamic(template, s, folder) == p for s, p in drawn.items())  # a seed reproduces its prompt
    assert len(set(drawn.values())) >= 6  # and seeds differ
    for p in drawn.values():
        assert "__" not in p and "{" not in p and "$$" not in p
        assert p.count(" and ") >= 2  # the separator form joins two choices
        assert p.endswith(("[cat|dog]", "bird"))  # A1111 alternation inside a variant stays whole
    # the request keeps the drawn prompt; the template goes into the infotext pairs
    request, extra = expand_request(GenerationRequest.create(prompt=template, seed=3), Prompting.at(wild_home))
    assert request.prompt == drawn[3] and extra == {"Template": template}


@pytest.mark.parametrize("prompt, message", [
    ("a __colour__", r"unknown wildcard __colour__: .*known: __color__, __scene/shape__"),
    ("a __../secret__", r"unknown wildcard"),
    ("a {red|blue", r"unbalanced '\{'"),
])
def test_bad_dynamic_prompts_one_line(wild_home, prompt, message):
    (wild_home / "secret.txt").write_text("outside\n")
    with pytest.raises(InvalidRequest, match=message) as exc:
        expand_request(GenerationRequest.create(prompt=prompt, seed=1), Prompting.at(wild_home))
    assert "\n" not in str(exc.value)


def test_generate_draws_the_prompt_and_writes_the_template(cli, capsys, wild_home, tmp_path):
    (tmp_path / "styles.csv").write_bytes(A1111_STYLES)
    code, out, err = cli(capsys, "generate", "a __color__ ball", "--style", "sketch", "--seed", "4", "--steps", "1",
                         "--width", "64", "--height", "64", "--model", "tiny-sd1", "--out", str(tmp_path / "w.png"),
                         "--quiet")
    assert code in (0, None), err
    text = read_infotext(tmp_path / "w.png")
    want = resolve_dynamic("a __color__ ball, pencil sketch", 4, wild_home / "wildcards")
    assert text.startswith(want + "\n") and 'Template: "a __color__ ball, pencil sketch"' in text
    code, _, err = cli(capsys, "generate", "x", "--style", "nope", "--out", str(tmp_path / "n.png"))
    assert code == 2 and "known styles: warm, sketch" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "n.png").exists()


# -- the X/Y/Z plot -------------------------------------------------------------------------------
def test_xyz_3x2x2_grids_labels_and_cells_that_recreate_themselves(studio, cli, capsys, tmp_path):
    base = GenerationRequest.create(prompt="a red circle", seed=11, steps=1, **TINY)
    plan = plan_xyz(base, parse_axis_option("CFG Scale: 2-6 (+2)"), parse_axis_option("Prompt S/R: red, blue"),
                    parse_axis_option("Seed: 5, 9"))
    assert plan.shape == (3, 2, 2) and len(plan.cells) == 12
    result = run_xyz(studio, plan, tmp_path / "plot")
    assert len(result.paths) == 12 and [p.name for p in result.grid_paths] == ["grid-z0.png", "grid-z1.png"]
    x, y, z = plan.axes
    assert [x.label(v) for v in x.values] == ["CFG Scale: 2.0", "CFG Scale: 4.0", "CFG Scale: 6.0"]
    assert [y.label(v) for v in y.values] == ["red", "blue"]  # A1111 shows S/R values bare
    assert [z.label(v) for v in z.values] == ["Seed: 5", "Seed: 9"]
    for iz, grid_path in enumerate(result.grid_paths):
        grid = pixels(grid_path)
        gh, gw = grid.shape[:2]
        top, left = gh - 2 * 64, gw - 3 * 64  # labels above and to the left of the 2 x 3 cells
        assert top > 0 and left > 0
        for cell in plan.cells[iz * 6:(iz + 1) * 6]:
            want = pixels(tmp_path / "plot" / f"cell-z{iz}-y{cell.iy}-x{cell.ix}.png")
            got = grid[top + cell.iy * 64: top + (cell.iy + 1) * 64, left + cell.ix * 64: left + (cell.ix + 1) * 64]
            assert np.array_equal(got, want)  # each cell where its labels say
            band = grid[:top, left + cell.ix * 64: left + (cell.ix + 1) * 64]
            assert (band < 128).any()  # a column label above it
        assert (grid[top:, :left] < 128).any()  # row labels
        text = read_infotext(grid_path)
        assert "X Type: CFG Scale" in text and 'Y Values: "red, blue"' in text and f"Seed: {5 if iz == 0 else 9}" in text
    # each cell's PNG is its own request: the cell's prompt, steps and seed, re-made bit for bit
    for cell, path in zip(plan.cells, result.paths):
        text = read_infotext(path)
        assert text.startswith(("a red circle\n", "a blue circle\n")[cell.iy])
        assert f"CFG scale: {2 * cell.ix + 2}," in text and f"Seed: {(5, 9)[cell.iz]}," in text
        again = studio.generate(request_from_infotext(text))  # what `generate --from` runs
        assert np.array_equal(pixels(again.images[0]), pixels(path))
    for path in result.paths[-1:]:  # and through the CLI itself
        code, _, err = cli(capsys, "generate", "--from", str(path), "--out", str(tmp_path / f"re-{path.name}"),
                           "--quiet")
        assert code in (0, None), err
        assert np.array_equal(pixels(tmp_path / f"re-{path.name}"), pixels(path))


def test_draw_grid_places_cells_under_their_labels():
    cells = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "black")]
    grid = pixels(draw_grid(cells, ["a", "b"], ["c", "d"], title="t"))
    h, w = grid.shape[:2]
    assert tuple(grid[h - 96, w - 96]) == (255, 0, 0) and tuple(grid[h - 96, w - 32]) == (0, 128, 0)
    assert tuple(grid[h - 32, w - 96]) == (0, 0, 255) and tuple(grid[h - 32, w - 32]) == (0, 0, 0)
    assert (grid[: h - 128, w - 128:] < 128).any() and (grid[h - 128:, : w - 128] < 128).any()  # the labels


def test_xyz_cli_and_bad_input(cli, capsys, tmp_path):
    code, out, err = cli(capsys, "xyz", "a red circle", "--x", "CFG Scale: 2, 9", "--steps", "1", "--seed", "3",
                         "--width", "64", "--height", "64", "--model", "tiny-sd1", "--out", str(tmp_path / "p"), "-q")
    assert code in (0, None), err
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == ["cell-z0-y0-x0.png", "cell-z0-y0-x1.png",
                                                                  "grid-z0.png"]
    bad = [
        (["--x", "Colour: 1,2"], "unknown axis 'Colour'; available: Nothing, Seed,"),
        (["--x", "Eta: 0,1"], "the A1111 axis 'Eta' is not available in danqing"),
        (["--x", "Steps: 1-20", "--y", "CFG Scale: 1-10"], "20 x 10 x 1 = 200 cells, more than the limit of 100"),
        (["--x", "Steps: 1, many"], "'many' is not a whole number or a range"),
        (["--x", "Prompt S/R: green, blue"], "'green' (the first value) is found in neither the prompt"),
        (["--x", "Sampler: Euler a, Nope"], "sampler"),
        (["--x", "Steps"], "write AXIS: VALUES"),
    ]
    for args, message in bad:
        code, _, err = cli(capsys, "xyz", "a red circle", *args, "--out", str(tmp_path / "bad"))
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (args, err)
        assert not (tmp_path / "bad").exists()


def test_find_axis_by_field_name_and_dropdown_values():
    assert find_axis("cfg_scale").label == "CFG Scale" and find_axis("denoising_strength").label == "Denoising"
    axis = make_axis(find_axis("Checkpoint name"), "", ["tiny-sd1 [abcdef1234]", "tiny-sd2"])
    f = GenerationRequest.create(prompt="p").model_dump()
    axis.type.apply(f, axis.values[0], list(axis.values), {})
    assert f["model"] == "tiny-sd1"
    assert plan_xyz(GenerationRequest.create(prompt="p", seed=1), make_axis(find_axis("Size"), "64x96, 128x64"),
                    NOTHING).cells[1].request.width == 128


# -- prompts from file ----------------------------------------------------------------------------
def test_prompts_file_lines_as_a1111_reads_them():
    assert parse_line("a red circle") == {"prompt": "a red circle"}
    assert parse_line('--prompt a red "circle, big" --negative_prompt blurry --steps 12 --seed 5 '
                      '--sampler_name "euler a" --n_iter 2 --cfg_scale 4.5') == {
        "prompt": "a red circle, big", "negative_prompt": "blurry", "steps": 12, "seed": 5, "sampler": "Euler a",
        "batch_count": 2, "cfg_scale": 4.5}
    base = GenerationRequest.create(prompt="best", seed=100, batch_size=2)
    jobs = plan_lines(base, "cat\n\n--prompt dog --seed 7\n--negative_prompt x", position="end", iterate_seed=True)
    assert [(j.lineno, j.request.prompt, j.request.seed) for j in jobs] == [
        (1, "best cat", 100), (3, "best dog", 7), (4, "best", 104)]
    for text, message in [("--steps many", "line 1: --steps 'many' is not a int"),
                          ("ok\n--tiling true", "line 2: --tiling is not supported by danqing"),
                          ("--bogus 1", "--bogus is not an option"), ("--steps 999", "line 1: steps: must be between")]:
        with pytest.raises(InvalidRequest, match=message):
            plan_lines(base, text)


def test_from_file_cli(cli, capsys, tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text('a red circle\n--prompt "a blue square" --cfg_scale 3 --seed 5\n')
    code, out, err = cli(capsys, "from-file", str(f), "--steps", "1", "--seed", "9", "--width", "64", "--height", "64",
                         "--model", "tiny-sd1", "--out", str(tmp_path / "pf"), "-q")
    assert code in (0, None), err
    texts = sorted(read_infotext(p) for p in (tmp_path / "pf").glob("*.png"))
    assert len(texts) == 2
    assert texts[0].startswith("a blue square\n") and "CFG scale: 3," in texts[0] and "Seed: 5," in texts[0]
    assert texts[1].startswith("a red circle\n") and "Steps: 1," in texts[1] and "Seed: 9," in texts[1]
    f.write_text("fine\n--steps 0\n")
    code, _, err = cli(capsys, "from-file", str(f), "--out", str(tmp_path / "pf2"))
    assert code == 2 and "line 2: steps: must be between 1 and 150" in err and not (tmp_path / "pf2").exists()


# -- the A1111 API ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def a1111(tmp_path_factory, models_dir):
    webuiapi = need_module("webuiapi", "pip install -e '.[test]'")
    from server_helpers import LiveServer, make_app

    from danqing import Settings, Studio

    home = tmp_path_factory.mktemp("workflow-home")
    (home / "styles.csv").write_bytes(A1111_STYLES)
    studio = Studio(Settings(home=home, models_dir=models_dir, device="cpu", dtype="fp32"))
    with LiveServer(make_app(home, studio=studio)) as server:
        yield webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler a", steps=1), server, studio


MODEL = {"override_settings": {"sd_model_checkpoint": "tiny-sd1"}, "width": 64, "height": 64}


def test_a1111_xyz_plot_script(a1111):
    api, _, studio = a1111
    # A1111 1.10's positions: x_type 4 = Steps, y_type 6 = CFG Scale; draw legend, include lone images
    r = api.txt2img(prompt="a red circle", seed=21, script_name="X/Y/Z plot",
                    script_args=[4, "1-2", [], 6, "3, 7", [], 0, "", [], True, True], **MODEL)
    assert len(r.images) == 1 + 4
    grid, cells = r.images[0], r.images[1:]
    assert grid.width > 2 * 64 and grid.height > 2 * 64
    assert [(t.split("Steps: ")[1].split(",")[0], t.split("CFG scale: ")[1].split(",")[0])
            for t in r.info["infotexts"][1:]] == [("1", "3"), ("2", "3"), ("1", "7"), ("2", "7")]
    assert "Script: X/Y/Z plot" in r.info["infotexts"][0] and r.info["all_seeds"] == [21] * 5
    direct = studio.generate(GenerationRequest.create(prompt="a red circle", seed=21, steps=2, cfg_scale=7,
                                                      sampler="Euler a", **TINY))
    assert np.array_equal(pixels(cells[3]), pixels(direct.images[0]))


def test_a1111_prompts_from_file_script_and_styles(a1111):
    api, server, _ = a1111
    r = api.txt2img(prompt="", seed=3, script_name="prompts from file or textbox",
                    script_args=[False, False, "start", 'a red circle\n--prompt "a blue square" --steps 2 --seed 5'],
                    **MODEL)
    assert len(r.images) == 2 and r.info["all_prompts"] == ["a red circle", "a blue square"]
    assert r.info["all_seeds"] == [3, 5] and "Steps: 2," in r.info["infotexts"][1]
    r = api.txt2img(prompt="a cat", negative_prompt="ugly", styles=["warm"], seed=1, **MODEL)
    assert r.info["infotexts"][0].startswith("a cat, warm light, golden hour\nNegative prompt: ugly, cold, blue\n")
    assert [s["name"] for s in api.get_prompt_styles()] == ["warm", "sketch", 'quote "q"']
    import requests

    for body, field, message in [
        ({"styles": ["nope"]}, "styles", "unknown style 'nope'; known styles: warm, sketch"),
        ({"script_name": "loopback"}, "script_name", "script 'loopback' is not available in danqing"),
        ({"script_name": "x/y/z plot", "script_args": [4, "1-200", [], 6, "1-30"]}, "xyz", "= 6000 cells"),
        ({"script_name": "x/y/z plot", "script_args": [13, "0,1"]}, "axis", "'Sigma Churn' is not available"),
        ({"script_args": [1]}, "script_args", "without a script_name"),
        # a cell names models as any request does: names of the listing, never paths
        ({"script_name": "x/y/z plot", "script_args": [11, "", ["tiny-sd1", "../../checkpoints/tiny-sd2"]]},
         "model", "unknown checkpoint '../../checkpoints/tiny-sd2'"),
    ]:
        resp = requests.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "p", **body}, timeout=60)
        assert resp.status_code == 422 and field in resp.text and message in resp.text, resp.text
