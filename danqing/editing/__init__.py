"""Image editing: img2img, inpaint, outpaint, hires fix, upscaling."""
