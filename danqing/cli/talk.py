"""``danqing app talk``: a talking portrait from a photo and a line of text or a sound file
(docs/apps.md, "Talking portrait")."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from danqing.cli.common import dated
from danqing.cli.control import app_app
from danqing.cli.video import video_target
from danqing.errors import InvalidRequest


@app_app.command("talk")
def app_talk(
    ctx: typer.Context,
    picture: Optional[Path] = typer.Argument(None, help="A photo with one clear, frontal face (optional with --from)."),
    text: Optional[str] = typer.Argument(None, help="The line to speak (Chinese characters for --voice zh); or give --audio."),
    voice: Optional[str] = typer.Option(None, help="Voice of espeak-ng: en (English) or zh (Mandarin) [default: en]."),
    audio: Optional[Path] = typer.Option(None, help="A sound file (WAV, MP3, ...) to move the mouth by its loudness, instead of text [default: none]."),
    fps: Optional[int] = typer.Option(None, help="Frames per second (1-60) [default: 25]."),
    strength: Optional[float] = typer.Option(None, help="How far the mouth opens (0-2) [default: 1]."),
    from_video: Optional[Path] = typer.Option(None, "--from", help="Re-create a talking portrait from an MP4 danqing wrote (options and arguments given here override) [default: none]."),
    out: Optional[str] = typer.Option(None, metavar="PATH", help="NAME.mp4 (H.264 + AAC sound, with NAME.mp4.json beside it), or a folder (ending with /) for a numbered NAME.mp4 [default: outputs/talk/DATE/]."),
):
    """A talking portrait: the photo's mouth moved by speech (espeak-ng's phonemes, or a sound
    file's loudness), written as an MP4 with the sound."""
    from danqing.apps.talk import TalkRequest, check_talk_out, read_request, talk

    fields = {"picture": str(picture) if picture is not None else None, "text": text, "voice": voice,
              "audio": str(audio) if audio is not None else None, "fps": fps, "strength": strength}
    fields = {k: v for k, v in fields.items() if v is not None}
    if from_video is not None:
        base = read_request(from_video)
        if "audio" in fields:
            fields["text"] = None
        elif "text" in fields:
            fields["audio"] = None
        request = base.replace(**fields)
    elif picture is None:
        raise InvalidRequest("picture", "give a PICTURE and a line of TEXT (or --audio), or --from VIDEO")
    else:
        request = TalkRequest.create(**fields)
    target = check_talk_out(video_target(out, dated(ctx.obj, "talk")))
    result = talk(request, target)
    for path in result.paths:
        print(path)
    typer.echo(f"{len(result.frames)} frames at {request.fps} fps ({len(result.frames) / request.fps:.2f} s)", err=True)
