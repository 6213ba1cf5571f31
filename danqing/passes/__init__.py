"""Generation passes: functions ``run_*(comps, request, ..., context=...) -> PassResult`` over
loaded Components, built on one batch loop (``batches.Batches``). txt2img and the SDXL
refiner live here; the editing passes (img2img / inpaint, hires fix, Prompt-to-Prompt) live
beside their mechanisms in ``danqing.editing`` and are built the same way."""
