"""The page: one ``gr.Blocks`` built in one function, its events wired to ``ui.handlers``
and its named API endpoints to ``ui.api``.

Concurrency: every event that runs a model (Generate, Compare, Unload and the ``generate``
and ``compare`` endpoints) shares the concurrency group "gpu" with a limit of one, so GPU
work goes through one queue and a waiting user sees their place in it. Planning, status,
memory readings and Cancel are in groups without a limit: they never wait behind a run, and
``enable_queue`` bounds the GPU queue alone, so they answer when it is full.
"""

from __future__ import annotations

import asyncio

import gradio as gr

from pipelines import speed
from presets import list_presets

from . import present
from .api import Api
from .handlers import AppHandlers

GPU_GROUP = "gpu"
GPU = dict(concurrency_id=GPU_GROUP, concurrency_limit=1)
FREE = dict(concurrency_limit=None)              # never waits behind the GPU queue
PRIVATE = dict(api_visibility="private")        # page plumbing, not part of the API

INTRO = ("Run big diffusion models on small machines. Pick a model and a prompt; the decision tree picks a "
         "memory preset from this machine's numbers (or pick one), and the graphs show where memory goes, "
         "phase by phase, against the cap and the planner's prediction.")


# The step caches offered in the list (any "kind:value" may be typed).
CACHE_CHOICES = [speed.CACHE_OFF, "first_block:0.05", "first_block:0.12", "mag:0.06", "taylorseer:5"]

# Gradio centres a plot's content; a Vega-Lite chart of width "container" needs the full width.
CSS = ".vega-embed { width: 100%; }"


def default_compare_presets(handlers: AppHandlers) -> list[str]:
    wanted = handlers.options.compare_presets or ("basic", "dynamic", "disk")
    return [p for p in wanted if p in list_presets()]


def build_blocks(handlers: AppHandlers) -> gr.Blocks:
    """The whole app. ``handlers`` holds its state (session, sampler, GPU runner)."""
    api = Api(handlers)
    model0 = handlers.initial_model()
    family0 = handlers.session.resolve_model(model0).family
    d = family0.defaults
    video0 = family0.kind == "video"
    models = handlers.model_choices()

    with gr.Blocks(title="Low-VRAM diffusion", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# Low-VRAM diffusion\n{INTRO}")
        with gr.Tabs():
            # -- Generate -----------------------------------------------------------------------
            with gr.Tab("Generate", id="generate"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=2, min_width=360):
                        model = gr.Dropdown(models, value=model0, label="Model", elem_id="model")
                        about = gr.Markdown(f"**{family0.title}** — {family0.description}")
                        # Filled in, so a first click on Generate makes a picture (the built-in model's kind).
                        prompt = gr.Textbox("a large yellow star on a purple background, top right", label="Prompt",
                                            lines=2, elem_id="prompt",
                                            placeholder="a small red circle on a blue background, top left")
                        negative = gr.Textbox(label="Negative prompt", lines=1)
                        preset = gr.Dropdown(handlers.preset_choices(), value=handlers.options.preset,
                                             label="Preset", info="auto: the decision tree chooses", elem_id="preset")
                        with gr.Row():
                            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate", scale=2)
                            cancel_btn = gr.Button("Cancel", variant="stop", elem_id="cancel", scale=1)
                        with gr.Accordion("Settings", open=True):
                            with gr.Row():
                                width = gr.Number(d.get("width", 1024), label="Width", precision=0, elem_id="width")
                                height = gr.Number(d.get("height", 1024), label="Height", precision=0,
                                                   elem_id="height")
                            with gr.Row():
                                steps = gr.Number(d.get("steps", 30), label="Steps", precision=0, elem_id="steps")
                                guidance = gr.Number(d.get("guidance", 0.0), label="Guidance", elem_id="guidance")
                            with gr.Row():
                                seed = gr.Number(0, label="Seed", precision=0, minimum=0, elem_id="seed")
                                random_seed = gr.Checkbox(True, label="Random seed", elem_id="random-seed")
                                frames = gr.Number(d.get("frames", 81) if video0 else None, label="Frames (4k+1)",
                                                   precision=0, visible=video0)
                            vae_tiling = gr.Checkbox(False, label="VAE tiling (less memory for large images)")
                            with gr.Accordion("Speed: attention, compile, channels_last, step cache", open=False):
                                with gr.Row():
                                    attention = gr.Dropdown(speed.attention_backends(), value=speed.AUTO,
                                                            label="Attention", elem_id="attention",
                                                            info="auto: the fastest installed kernel for this device "
                                                                 "(native on the CPU); a UNet takes native only")
                                    cache = gr.Dropdown(CACHE_CHOICES, value=speed.CACHE_OFF, label="Step cache",
                                                        allow_custom_value=True, elem_id="cache",
                                                        info="reuse work across steps (FLUX.1, Qwen-Image, Wan; mag: "
                                                             "FLUX.1 only); faster, not exact")
                                with gr.Row():
                                    compile_on = gr.Checkbox(False, label="Compile", elem_id="compile",
                                                             info="torch.compile the denoiser's repeated blocks; the "
                                                                  "first run compiles (seconds to minutes)")
                                    channels_last = gr.Checkbox(False, label="channels_last", elem_id="channels-last",
                                                                info="the UNet's and the VAE's convolutions in the "
                                                                     "channels_last memory format")
                        with gr.Accordion("Advanced: vram_limit and the 8-key config per component", open=False):
                            with gr.Row():
                                cap_on = gr.Checkbox(False, label="Set vram_limit myself", scale=1)
                                vram_limit = gr.Slider(0, handlers.vram_slider_max(), value=0, step=0.25,
                                                       label="vram_limit (GiB)", scale=3,
                                                       info="presets that manage layers keep at most this much "
                                                            "on the device; 0 streams every layer")
                            custom_on = gr.Checkbox(False, label="Run with the configs below instead of the preset")
                            configs = gr.Code(language="json", label="Configs per component (DiffSynth's 8 keys "
                                              "plus vram_limit, prefetch, pin_memory, ram_cache_gib)",
                                              interactive=True, lines=12)
                        with gr.Accordion("Plan: the decision tree and predicted peaks", open=True):
                            plan_md = gr.Markdown(elem_id="plan")
                            predictions = gr.Dataframe(headers=present.PREDICTION_HEADERS, interactive=False,
                                                       label="Predicted peaks per preset")
                        hardware = gr.Markdown(elem_id="hardware")
                        with gr.Row():
                            refresh_btn = gr.Button("Refresh machine", size="sm")
                            unload_btn = gr.Button("Unload model", size="sm")
                    with gr.Column(scale=3, min_width=420):
                        status = gr.HTML(present.status_html(None), elem_id="status")
                        caption = gr.Markdown()
                        gpu_plot = gr.Plot(label="GPU memory", visible=False, elem_id="gpu-plot")
                        ram_plot = gr.Plot(label="RAM", elem_id="ram-plot")
                        gallery = gr.Gallery(label="Result", columns=2, height=360, visible=not video0,
                                             elem_id="gallery")
                        video = gr.Video(label="Result", visible=video0, elem_id="video")
                        summary = gr.Markdown(elem_id="summary")
                        timeline = gr.File(label="Timeline (CSV)", elem_id="timeline")

            job_fields = [model, prompt, negative, preset, custom_on, configs, cap_on, vram_limit, random_seed, seed,
                          steps, width, height, guidance, vae_tiling, frames, attention, compile_on, channels_last,
                          cache]

            # -- Compare ------------------------------------------------------------------------
            with gr.Tab("Compare", id="compare"):
                gr.Markdown("The job of the Generate tab (model, prompt, settings, vram_limit) under each preset "
                            "below, one after another, with one seed: time, peaks against cap and prediction, "
                            "memory curves overlaid, images side by side.")
                compare_presets = gr.CheckboxGroup(list_presets(), value=default_compare_presets(handlers),
                                                   label="Presets", elem_id="compare-presets")
                with gr.Row():
                    compare_btn = gr.Button("Compare", variant="primary", elem_id="compare")
                    compare_cancel = gr.Button("Cancel", variant="stop")
                compare_status = gr.Markdown("Ready")
                compare_table = gr.Dataframe(headers=present.COMPARE_HEADERS, interactive=False, label="Per preset")
                compare_gpu = gr.Plot(label="GPU memory per preset", visible=False)
                compare_ram = gr.Plot(label="Process RSS per preset")
                compare_gallery = gr.Gallery(label="Images", columns=5, height=260)

            # -- Memory -------------------------------------------------------------------------
            with gr.Tab("Memory", id="memory"):
                gr.Markdown("This server's memory over the last minute, whoever's job runs, read from the "
                            "sampler without waiting for the GPU queue.")
                watch_on = gr.Checkbox(False, label="Watch live (refreshes every second)")
                watch_status = gr.Markdown()
                watch_gpu = gr.Plot(label="GPU memory", visible=False)
                watch_ram = gr.Plot(label="RAM")
                timer = gr.Timer(1.0, active=False)

        # -- events ---------------------------------------------------------------------------
        plan_outputs = [plan_md, predictions, configs]
        demo.load(handlers.hardware_card, outputs=hardware, api_name="hardware_ui", **FREE, **PRIVATE)
        demo.load(handlers.plan_view, inputs=job_fields, outputs=plan_outputs, api_name="plan_ui", **FREE, **PRIVATE)
        refresh_btn.click(handlers.hardware_card, outputs=hardware, api_name="refresh_ui", **FREE, **PRIVATE)
        model.change(handlers.model_changed, inputs=model, outputs=[width, height, steps, guidance, frames, gallery,
                                                                    video, about],
                     api_name="model_ui", **FREE, **PRIVATE)
        gr.on([model.change, preset.change, width.change, height.change, steps.change, guidance.change,
               frames.change, vae_tiling.change, cap_on.change, vram_limit.release, custom_on.change,
               cache.change, compile_on.change, generate_btn.click],
              handlers.plan_view, inputs=job_fields, outputs=plan_outputs, show_progress="hidden",
              trigger_mode="always_last", concurrency_id="plan", api_name="replan_ui", **FREE, **PRIVATE)

        run_outputs = [status, caption, gpu_plot, ram_plot, gallery, video, summary, timeline]
        run = gr.on([generate_btn.click, prompt.submit], handlers.generate, inputs=job_fields, outputs=run_outputs,
                    show_progress_on=[gallery, video], api_name="generate_ui", **GPU, **PRIVATE)
        cancel_btn.click(handlers.cancel, outputs=[status, caption, gpu_plot, ram_plot, summary, timeline],
                         cancels=[run], concurrency_id="control", api_name="cancel_ui", **FREE, **PRIVATE)
        unload_btn.click(handlers.unload, outputs=status, api_name="unload", **GPU)

        comparing = compare_btn.click(handlers.compare, inputs=job_fields + [compare_presets],
                                      outputs=[compare_status, compare_table, compare_gpu, compare_ram,
                                               compare_gallery],
                                      show_progress_on=[compare_status], api_name="compare_ui", **GPU, **PRIVATE)
        compare_cancel.click(handlers.cancel_compare, cancels=[comparing],
                             outputs=[compare_status, compare_table, compare_gpu, compare_ram, compare_gallery],
                             concurrency_id="control", api_name="cancel_compare_ui", **FREE, **PRIVATE)

        watch_on.change(lambda on: gr.Timer(active=on), inputs=watch_on, outputs=timer, api_name="watch_ui",
                        **FREE, **PRIVATE)
        timer.tick(handlers.watch, outputs=[watch_gpu, watch_ram, watch_status], show_progress="hidden",
                   concurrency_id="watch", api_name="tick_ui", **FREE, **PRIVATE)

        _api_endpoints(api, model0)
    return demo


def _api_endpoints(api: Api, model0: str) -> None:
    """Hidden components carrying the API's parameters (their initial values are the
    defaults a client sees), and one hidden trigger per endpoint."""
    with gr.Column(visible=False):
        prompt = gr.Textbox(None, label="prompt")
        negative = gr.Textbox("", label="negative_prompt")
        model = gr.Textbox(model0, label="model")
        preset = gr.Textbox("auto", label="preset")
        presets = gr.Dropdown(list_presets(), value=["basic", "dynamic", "disk"], multiselect=True,
                              allow_custom_value=True, label="presets")
        numbers = {name: gr.Number(None, label=name) for name in
                   ("vram_limit", "width", "height", "steps", "guidance", "seed", "frames")}
        attention = gr.Textbox(speed.AUTO, label="attention")
        compile_on = gr.Checkbox(False, label="compile")
        channels_last = gr.Checkbox(False, label="channels_last")
        cache = gr.Textbox(speed.CACHE_OFF, label="cache")
        speeds = [attention, compile_on, channels_last, cache]
        seconds = gr.Number(10, label="seconds")
        file = gr.File(label="file")
        summary = gr.JSON(label="summary")
        table = gr.JSON(label="summaries")
        images = gr.Gallery(label="images")
        info = gr.JSON(label="result")
        n = numbers
        gr.Button(visible=False).click(
            api.generate, inputs=[prompt, negative, model, preset, n["vram_limit"], n["width"], n["height"],
                                  n["steps"], n["guidance"], n["seed"], n["frames"], *speeds],
            outputs=[file, summary], api_name="generate", **GPU)
        gr.Button(visible=False).click(
            api.compare, inputs=[prompt, presets, model, negative, n["vram_limit"], n["width"], n["height"],
                                 n["steps"], n["guidance"], n["seed"], n["frames"], *speeds],
            outputs=[table, images], api_name="compare", **GPU)
        gr.Button(visible=False).click(
            api.plan, inputs=[model, preset, n["vram_limit"], n["width"], n["height"], n["steps"], n["guidance"],
                              n["frames"], *speeds], outputs=info, api_name="plan", concurrency_id="plan", **FREE)
        gr.Button(visible=False).click(api.status, outputs=info, api_name="status", concurrency_id="control", **FREE)
        gr.Button(visible=False).click(api.memory, inputs=seconds, outputs=info, api_name="memory",
                                       concurrency_id="control", **FREE)
        gr.Button(visible=False).click(api.hardware, outputs=info, api_name="hardware", concurrency_id="control",
                                       **FREE)
        gr.Button(visible=False).click(api.models, outputs=info, api_name="models", concurrency_id="control", **FREE)
        gr.Button(visible=False).click(api.cancel, outputs=info, api_name="cancel", concurrency_id="control", **FREE)


def enable_queue(demo: gr.Blocks, max_gpu_queue: int | None) -> gr.Blocks:
    """Gradio's queue for ``demo``, where at most ``max_gpu_queue`` GPU events (None: any
    number) may wait; ``demo``, to launch.

    Gradio's own ``max_size`` counts the waiting events of every concurrency group together
    (``Queue.__len__`` and the check at the top of ``Queue.push``, gradio/queueing.py), so a
    full GPU queue would refuse plans, status, memory readings and Cancel as well; and
    ``gradio_client`` joins the queue for every endpoint, ``queue=False`` ones too, so taking
    the reads off the queue would not help its users. Gradio has no limit per group, so the
    queue gets none and ``Queue.push`` refuses GPU events itself, with Gradio's own answer to
    a full queue (HTTP 503, which ``gradio_client`` raises as ``QueueError`` and the page
    shows as "This application is currently busy")."""
    demo.queue(max_size=None, default_concurrency_limit=1)
    if max_gpu_queue is None:
        return demo
    queue = demo._queue
    push = queue.push
    lock = asyncio.Lock()   # one GPU join at a time: the count and the append go together

    async def push_within_gpu_limit(body, request, username):
        fn = demo.fns.get(body.fn_index) if body.fn_index is not None else None
        if fn is None or fn.concurrency_id != GPU_GROUP:
            return await push(body, request, username)
        async with lock:
            waiting = queue.event_queue_per_concurrency_id.get(GPU_GROUP)
            size = len(waiting.queue) if waiting is not None else 0
            if size >= max_gpu_queue:
                return False, f"The GPU queue is full: {size} requests wait. Please try again later.", "queue_full"
            return await push(body, request, username)

    queue.push = push_within_gpu_limit
    return demo
