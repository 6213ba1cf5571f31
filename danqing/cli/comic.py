"""``danqing app comic draft|reroll|render STORY``: the comic workflow (docs/apps.md, "Comic")."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from danqing.cli.common import announce_device, make_studio
from danqing.cli.control import app_app

comic_app = typer.Typer(help="Comic: a storyboard -> panels with one character -> a laid-out page (docs/apps.md).",
                        no_args_is_help=True)
app_app.add_typer(comic_app, name="comic")

STORY = typer.Argument(..., help="The storyboard: TOML, or a text file of one scene line per panel.")
PROJECT = typer.Option(None, "--project", help="The project folder [default: the storyboard's path without its extension].")


def _project(story: Path, project: Optional[Path]):
    from danqing.apps.comic import ComicProject

    return ComicProject(story, project)


def _studio(ctx):
    studio = make_studio(ctx.obj)
    announce_device(studio)
    return studio


@comic_app.command("draft")
def comic_draft(
    ctx: typer.Context,
    story: Path = STORY,
    project: Optional[Path] = PROJECT,
    panel: List[int] = typer.Option([], "--panel", help="Draw only these panels (1-based, repeatable) [default: all]."),
):
    """The draft pass at the storyboard's size, and a contact sheet to review."""
    comic = _project(story, project)
    sheet = comic.draft(_studio(ctx), panel or None)
    typer.echo(f"{len(panel) or len(comic.story.panels)} panels drawn; contact sheet: {sheet}")


@comic_app.command("reroll")
def comic_reroll(
    ctx: typer.Context,
    story: Path = STORY,
    panel: int = typer.Option(..., "--panel", help="The panel to draw again with a new seed (1-based)."),
    project: Optional[Path] = PROJECT,
):
    """A new seed for one panel (kept in the project file) and its draft drawn again."""
    comic = _project(story, project)
    sheet = comic.reroll(_studio(ctx), panel)
    typer.echo(f"panel {panel}: seed {comic.seeds()[panel - 1]}; contact sheet: {sheet}")


@comic_app.command("render")
def comic_render(
    ctx: typer.Context,
    story: Path = STORY,
    project: Optional[Path] = PROJECT,
):
    """The final pass (hires fix) of every panel with the project's seeds, then the pages, a PDF and a CBZ."""
    comic = _project(story, project)
    for path in comic.render(_studio(ctx)):
        typer.echo(str(path))
