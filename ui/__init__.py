"""ui: the Gradio app's page, handlers, charts and jobs. No torch here: plans and runs go
through presets/ (which drives pipelines/), memory readings through vram.sampler.

    from ui import AppOptions, build_app, enable_queue
    demo, handlers = build_app(AppOptions(models_dir="models"))
    enable_queue(demo, max_gpu_queue=32).launch()
"""

from __future__ import annotations

from .handlers import AppHandlers, AppOptions
from .layout import CSS, build_blocks, enable_queue


def build_app(options: AppOptions):
    """The page and its handlers (whose sampler is started); ``handlers.close()`` at exit."""
    handlers = AppHandlers(options)
    handlers.start()
    return build_blocks(handlers), handlers


__all__ = ["CSS", "AppHandlers", "AppOptions", "build_app", "build_blocks", "enable_queue"]
