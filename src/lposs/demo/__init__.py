"""The web demo: upload a photo, name classes, see LPOSS / LPOSS+ segment it.

Gradio is an optional extra (``pip install "lposs[demo]"``), imported only by
:func:`build_demo` and :func:`launch`. :class:`DemoBackend` holds what the page runs
on and needs no Gradio: the encoders (built on first use, shared by every preset that
names them), one ``Segmenter`` per setting sharing those encoders, and the encoded
images, cached by image content, so that changing the class names, the method (LPOSS
or LPOSS+) or the propagation settings never re-runs the encoders.
"""

from __future__ import annotations

import html
import math
import os
import signal
import threading
from importlib import resources
from pathlib import Path

from ..errors import LpossError
from ..methods import METHODS as _TABLE
from .backend import DemoBackend, DemoResult

__all__ = [
    "DemoBackend",
    "DemoResult",
    "EXAMPLES",
    "METHODS",
    "GRADIO_MISSING",
    "DEFAULT_MAX_FILE_SIZE",
    "DEFAULT_MAX_QUEUE",
    "require_gradio",
    "examples_dir",
    "build_demo",
    "launch",
]

#: The one-line error shown when Gradio is not installed.
GRADIO_MISSING = 'the web demo needs Gradio, an optional extra: pip install "lposs[demo]"'
#: Largest upload Gradio accepts.
DEFAULT_MAX_FILE_SIZE = "25mb"
#: Most requests waiting in line (one runs at a time); more are refused as "queue full".
DEFAULT_MAX_QUEUE = 16
#: Seconds a stop (Ctrl-C, SIGTERM) waits for the request being computed to finish.
_STOP_GRACE_S = 10.0
#: The method choice: the name shown -> whether the pixel stage (LPOSS+) runs.
METHODS = {name.upper(): "lposs+" in _TABLE[name].refiners for name in ("lposs+", "lposs")}
#: Bundled example images (drawn procedurally for lposs) and suggested class names.
EXAMPLES = {
    "house.png": "sky, grass;lawn, house;wall, roof, door, window, sun",
    "lake.png": "sky, mountain;hill, lake;water, sand;beach, tree",
}
# Presets offered in the page: "lposs" and "lposs+" differ only by the pixel stage,
# which the method choice sets, so "dino-b16" stands for both.
_HIDDEN_PRESETS = ("lposs", "lposs+")


def require_gradio():
    """Import Gradio, or raise ``LpossError(GRADIO_MISSING)``."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError:
        raise LpossError(GRADIO_MISSING) from None
    return gradio


def examples_dir() -> Path:
    """The folder holding the bundled example images."""
    return Path(str(resources.files("lposs").joinpath("data", "examples")))


# ------------------------------------------------------------------------ the page
def _shares_html(shares) -> str:
    rows = "".join(
        f'<tr><td><span class="lposs-swatch" style="background:rgb{color}"></span></td>'
        f"<td>{html.escape(name)}</td><td>{share:.1%}</td></tr>"
        for name, color, share in sorted(shares, key=lambda s: -s[2])
    )
    return ('<table class="lposs-shares"><thead><tr><th></th><th>class</th><th>share of '
            f"pixels</th></tr></thead><tbody>{rows}</tbody></table>")


def _timings_md(result: DemoResult) -> str:
    labels = {"encode": "encoders (once per image)", "text": "text encoder",
              "patch_lp": "LPOSS (patches)", "pixel_lp": "LPOSS+ (pixels)",
              "resize_argmax": "resize + argmax"}
    lines = ["| stage | seconds |", "|---|---|"]
    for key, seconds in result.timings.items():
        label = labels.get(key, key)
        if key == "encode" and result.encoded_reused:
            lines.append(f"| {label} | reused |")
        else:
            lines.append(f"| {label} | {seconds:.2f} |")
    lines.append(f"| **total** | **{sum(result.timings.values()):.2f}** |")
    return "\n".join(lines)


def _threshold(text: str | None) -> float | None:
    """The unknown threshold typed in the page: None when empty."""
    if text is None or not str(text).strip():
        return None
    try:
        value = float(str(text).strip())
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LpossError(f"the unknown threshold must be a number such as 0.1, got {text!r}")
    return value


_CSS = """
.lposs-shares td, .lposs-shares th { padding: 2px 10px; text-align: left; }
.lposs-swatch { display: inline-block; width: 16px; height: 16px; border: 1px solid #888; }
"""


def _run(gr, backend: DemoBackend, image, classes, method_name, preset, threshold):
    """One click: the page's five outputs (status, overlay, shares, timings, files)."""
    # Raw inputs (preprocess=False): Gradio's own image preprocessing would open the
    # upload with Pillow and fail with a stack trace on a file that is not an image;
    # image.read_image checks it instead. Gradio still keeps uploads to its cache folder.
    if isinstance(image, dict):
        image = image.get("path")
    try:
        if method_name not in METHODS:
            raise LpossError(f"choose a method: {' or '.join(METHODS)}")
        result = backend.segment(image, classes, preset=preset,
                                 refine=METHODS[method_name],
                                 unknown_threshold=_threshold(threshold))
    except LpossError as err:
        gr.Warning(str(err))
        message = f"**Error:** {html.escape(str(err))}"
        return message, None, "", "", None
    height, width = result.size
    status = (f"Segmented a {width}x{height} image into {len(result.shares)} classes with "
              f"{method_name} ({preset}); "
              + ("the image encoding was reused." if result.encoded_reused
                 else "the image was encoded."))
    return (status, result.overlay, _shares_html(result.shares), _timings_md(result),
            [str(p) for p in result.files])


def _preset_choices(backend: DemoBackend) -> tuple[list[str], str]:
    """The presets of the menu and the one selected at first."""
    presets = [p for p in backend.presets if p not in _HIDDEN_PRESETS]
    default = backend.default_preset
    default = "dino-b16" if default in _HIDDEN_PRESETS and "dino-b16" in presets else default
    if default not in presets:
        presets.insert(0, default)
    return presets, default


def build_demo(backend: DemoBackend, *, method: str = "LPOSS+",
               max_queue: int | None = DEFAULT_MAX_QUEUE, max_file_size: str | int | None = None):
    """The Gradio page (a ``gr.Blocks``) running on ``backend``.

    Args:
        backend: the models and caches.
        method: the method selected at first, a key of ``METHODS``.
        max_queue: requests that may wait in line (stated on the page; ``launch`` sets it).
        max_file_size: the upload limit (stated on the page; ``launch`` sets it).
    """
    gr = require_gradio()
    if method not in METHODS:
        raise ValueError(f"method must be one of {list(METHODS)}, got {method!r}")
    presets, default = _preset_choices(backend)

    def run(image, classes, method_name, preset, threshold):  # Gradio's API name: /run
        return _run(gr, backend, image, classes, method_name, preset, threshold)

    # delete_cache: Gradio's copies of uploads and results older than an hour are deleted
    # every hour and when the server stops.
    with gr.Blocks(title="LPOSS demo", analytics_enabled=False,
                   delete_cache=(3600, 3600)) as page:
        gr.Markdown(
            "## LPOSS: open-vocabulary semantic segmentation by label propagation\n"
            "Upload an image, type the classes to look for (comma-separated; `;` joins "
            "synonyms of one class, e.g. `grass;lawn`) and press **Segment**. The image is "
            "encoded once: trying other class names or the other method only reruns the "
            "propagation."
        )
        gr.Markdown(_limits_md(backend, max_queue, max_file_size), elem_id="lposs-limits")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(label="Image", type="filepath", image_mode=None,
                                 sources=["upload", "clipboard"], elem_id="lposs-image",
                                 height=320)
                classes = gr.Textbox(label="Classes", elem_id="lposs-classes", lines=1,
                                     placeholder="sky, grass;lawn, house, sun",
                                     info="comma-separated; ';' joins synonyms; Enter runs")
                with gr.Row():
                    method_box = gr.Radio(list(METHODS), value=method, label="Method",
                                          info="LPOSS+ adds the pixel-level refinement",
                                          elem_id="lposs-method")
                    preset_box = gr.Dropdown(presets, value=default, label="Preset",
                                             elem_id="lposs-preset",
                                             info="models and windows")
                threshold = gr.Textbox(label="Unknown threshold (optional)",
                                       elem_id="lposs-threshold", placeholder="off",
                                       info="pixels whose best score (cosine scale, e.g. "
                                            "0.1) is below it are 'unknown'; empty: off")
                button = gr.Button("Segment", variant="primary", elem_id="lposs-run")
                gr.Examples(
                    [[str(examples_dir() / name), names] for name, names in EXAMPLES.items()],
                    inputs=[image, classes], label="Examples (drawn for this demo)",
                )
            with gr.Column(scale=1):
                status = gr.Markdown("Upload an image and type class names.",
                                     elem_id="lposs-status")
                overlay = gr.Image(label="Segmentation", type="pil", format="png",
                                   interactive=False, elem_id="lposs-overlay", height=360)
                shares = gr.HTML(elem_id="lposs-shares")
                timings = gr.Markdown(elem_id="lposs-timings")
                files = gr.File(label="Downloads: label PNG (pixel = class index, 255 = "
                                      "unknown) and JSON summary", file_count="multiple",
                                interactive=False, elem_id="lposs-files")
        inputs = [image, classes, method_box, preset_box, threshold]
        outputs = [status, overlay, shares, timings, files]
        for event in (button.click, classes.submit):
            event(run, inputs, outputs, preprocess=False, concurrency_id="lposs",
                  concurrency_limit=1)
    return page


def _limits_md(backend: DemoBackend, max_queue: int | None,
               max_file_size: str | int | None) -> str:
    """The page's line on what one request may cost and how many may wait."""
    limits = backend.limits()
    if max_file_size is not None:
        limits += f"; uploads up to {max_file_size}"
    line = "one request runs at a time"
    if max_queue is not None:
        line += f", at most {max_queue} wait in line (more are refused until it shortens)"
    return f"<small>Limits: {html.escape(limits)}; {line}.</small>"


def launch(
    backend: DemoBackend,
    *,
    host: str = "127.0.0.1",
    port: int = 7860,
    method: str = "LPOSS+",
    max_file_size: str | int = DEFAULT_MAX_FILE_SIZE,
    max_queue: int | None = DEFAULT_MAX_QUEUE,
) -> int:
    """Serve the demo until interrupted (local only by default; never a share link).

    One request is computed at a time and at most ``max_queue`` wait; each is bounded by
    the backend's ``max_pixels`` and the working size (:meth:`DemoBackend.limits`, stated
    on the page). Ctrl-C (SIGINT) or SIGTERM stops it cleanly when it runs in the main
    thread: the server is closed, the request being computed gets a few seconds to
    finish, and the downloadable files are deleted.

    Returns:
        The exit status for the command line: 0 after Ctrl-C or a server that stopped by
        itself, 143 (128 + SIGTERM) after SIGTERM.
    """
    gr = require_gradio()
    if max_queue is not None and max_queue < 1:
        raise ValueError(f"max_queue must be >= 1 or None, got {max_queue}")
    page = build_demo(backend, method=method, max_queue=max_queue, max_file_size=max_file_size)
    stop = threading.Event()
    received: list[int] = []

    def _stop(signum, frame):
        received.append(signum)
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if in_main_thread:
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, _stop)
    try:
        # quiet: Gradio's start-up lines include advice on share links, which this
        # command never makes; prevent_thread_lock: we wait here, for our own signals.
        page.queue(default_concurrency_limit=1, max_size=max_queue).launch(
            server_name=host, server_port=port, share=False, inbrowser=False,
            max_file_size=max_file_size, show_error=False, ssr_mode=False,
            allowed_paths=[str(examples_dir()), str(backend.output_dir)],
            footer_links=[], css=_CSS, theme=gr.themes.Default(), quiet=True,
            prevent_thread_lock=True,
        )
        print(f"serving the LPOSS demo on {page.local_url} (Ctrl-C to stop)", flush=True)
        while page.is_running and not stop.wait(0.25):
            pass
    finally:
        page.close(verbose=False)
        backend.wait_idle(_STOP_GRACE_S)
        backend.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    return 128 + signal.SIGTERM if signal.SIGTERM in received else 0
