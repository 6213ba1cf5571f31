"""Video generation over the studio: AnimateDiff motion modules on danqing's checkpoints
(``VideoStudio``), written as MP4/GIF/WebP/PNG frames with their parameters (docs/video.md)."""
