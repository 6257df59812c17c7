"""The Gradio app: pick a model and a prompt, see which memory preset the decision tree picks
and why, generate with live memory graphs by phase, compare presets.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:pass]
                  [--model tiny-shapes] [--preset auto] [--models-dir models]

Serves http://127.0.0.1:7860 (this machine only) by default; on a Hugging Face Space the
Space's own address and port (``GRADIO_SERVER_NAME``/``GRADIO_SERVER_PORT``) apply.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path


def _auth(value: str) -> tuple[str, str]:
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth takes user:password")
    return user, password


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
                        help="address to serve on (default: 127.0.0.1, this machine only; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also open a public Gradio share link")
    parser.add_argument("--auth", type=_auth, help="user:password required to open the page and the API")
    parser.add_argument("--model", help="the model picked when the page opens (default: the built-in one)")
    parser.add_argument("--preset", default="auto", help="the preset picked when the page opens (default: auto)")
    parser.add_argument("--models-dir", help="where models are downloaded and local model folders live "
                                             "(default: $LOWVRAM_MODELS_DIR or ./models)")
    parser.add_argument("--outputs", default="outputs", help="where images, videos and timelines are saved")
    parser.add_argument("--source", default="modelscope", choices=("modelscope", "huggingface"),
                        help="where registry models download from")
    parser.add_argument("--max-queue", type=int, default=32, help="requests that may wait in the GPU queue")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def _bound_malloc_arenas(count: int = 2) -> None:
    """Every job runs on a thread of its own, and glibc gives threads malloc arenas of their
    own (up to 8 per core), whose freed memory stays in the process: a long-running server's
    RSS then creeps up job after job. A few shared arenas keep it flat (glibc only)."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, count)  # M_ARENA_MAX
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    if "MALLOC_ARENA_MAX" not in os.environ:
        _bound_malloc_arenas()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ui import CSS, AppOptions, build_app, enable_queue
    options = AppOptions(models_dir=Path(args.models_dir) if args.models_dir else None, outputs=Path(args.outputs),
                         model=args.model, preset=args.preset, source=args.source)
    demo, handlers = build_app(options)
    try:
        enable_queue(demo, args.max_queue).launch(
            server_name=args.host, server_port=args.port, share=args.share, auth=args.auth,
            allowed_paths=[str(Path(args.outputs).resolve())], footer_links=["api", "gradio"], css=CSS)
    finally:
        handlers.close()


if __name__ == "__main__":
    main()
