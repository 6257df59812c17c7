"""ui: the Gradio app's page, handlers, charts and jobs. No torch here: plans and runs go
through presets/ (which drives pipelines/), memory readings through vram.sampler.

    from ui import AppOptions, build_app
    demo, handlers = build_app(AppOptions(models_dir="models"))
    demo.queue().launch()
"""

from __future__ import annotations

from .handlers import AppHandlers, AppOptions
from .layout import CSS, build_blocks


def build_app(options: AppOptions):
    """The page and its handlers (whose sampler is started); ``handlers.close()`` at exit."""
    handlers = AppHandlers(options)
    handlers.start()
    return build_blocks(handlers), handlers


__all__ = ["CSS", "AppHandlers", "AppOptions", "build_app", "build_blocks"]
