"""The Gradio app. For now a placeholder that serves the core's live status; the generate
tab, presets and memory graphs arrive with the app issue.

    python app.py [--host 127.0.0.1] [--port 7860] [--share]
"""

from __future__ import annotations

import argparse
import json


def build_ui():
    import gradio as gr

    import vram

    def core_status() -> str:
        return json.dumps(vram.stats(), indent=2, default=str)

    with gr.Blocks(title="Low-VRAM diffusion") as demo:
        gr.Markdown("# Low-VRAM diffusion\nThe memory core (`vram/`) is in place; model pipelines, "
                    "presets and generation come next. Below: what the core holds right now.")
        status = gr.Code(core_status(), language="json", label="Core status")
        gr.Button("Refresh").click(core_status, outputs=status, api_name="status")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: localhost only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    args = parser.parse_args(argv)
    build_ui().queue().launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
