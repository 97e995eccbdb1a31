"""The Gradio app: a Predict tab and an Evaluation report tab, both talking to the prediction API."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import gradio as gr
from PIL import Image

from serve.schemas import AdapterVersion, ModelsResponse
from ui import views
from ui.api_client import ApiClient, ApiError
from ui.examples import example_images
from ui.settings import UISettings

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R")
Confidences = dict[str, float] | None
Rows = list[list[object]]
ReportView = tuple[str, Image.Image | None, Rows]

INTRO = (
    "# petbreed: which breed is this pet?\n"
    "Upload, drop, paste or snap a photo of a cat or dog; a LoRA-tuned Gemma 4 names its breed. "
    "Prediction API: `{api}`"
)


def _raw_image(**kwargs: Any) -> gr.Image:
    """A gr.Image that hands over the uploaded file as it is.

    Stock gr.Image opens the file with PIL before our function runs, so a broken upload fails inside
    Gradio with a bare "Error". Passing the path through lets the API judge the file and its answer
    (400/413/415) reach the page as a sentence. Patched on the instance: a gr.Image subclass would
    make Gradio write a .pyi stub next to this module.
    """
    image = gr.Image(type="filepath", **kwargs)
    stock = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return payload.path
        return stock(payload)

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _guarded(fallback: Callable[[str], R]) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Turn any exception into `fallback(message)`: the page shows a sentence, never a traceback."""

    def wrap(fn: Callable[P, R]) -> Callable[P, R]:
        def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return fn(*args, **kwargs)
            except ApiError as exc:
                return fallback(str(exc))
            except Exception as exc:  # a UI bug must still not put a traceback on the page
                log.exception("UI handler %s failed", fn.__name__)
                return fallback(f"Unexpected error in the UI ({type(exc).__name__}: {exc}); see the server log.")

        guarded.__name__ = fn.__name__
        return guarded

    return wrap


class Handlers:
    """The page's event handlers; each is a short function of its inputs and the API."""

    def __init__(self, client: ApiClient, settings: UISettings) -> None:
        self.client = client
        self.settings = settings

    def predict(self, image: str | None, adapter: str | None) -> tuple[Confidences, str]:
        """Classify one image file; returns (top-k confidences, result text)."""
        return _predict(self.client, self.settings.top_k, image, adapter)

    def load_adapters(self) -> tuple[Any, str]:
        return _load_adapters(self.client)

    def adapter_details(self, ref: str | None) -> tuple[str, str, Image.Image | None, Rows]:
        return _adapter_details(self.client, ref)


def _prediction_failed(message: str) -> tuple[Confidences, str]:
    return None, views.error_markdown(message)


def _details_failed(message: str) -> tuple[str, str, Image.Image | None, Rows]:
    return "", f"**Error:** {message}", None, []


@_guarded(_prediction_failed)
def _predict(client: ApiClient, top_k: int, image: str | None, adapter: str | None) -> tuple[Confidences, str]:
    if not image:
        return None, "Upload a photo (or pick an example) to see its breed."
    response = client.predict_file(Path(image), adapter or None, top_k)
    return views.confidences(response), views.prediction_markdown(response)


@_guarded(lambda message: (gr.Dropdown(choices=[], value=None), f"**Error:** {message}"))
def _load_adapters(client: ApiClient) -> tuple[Any, str]:
    refs, default = views.adapter_choices(client.models())
    if not refs:
        return gr.Dropdown(choices=[], value=None), "The API serves no adapter yet; train and publish one."
    return gr.Dropdown(choices=refs, value=default), ""


@_guarded(_details_failed)
def _adapter_details(client: ApiClient, ref: str | None) -> tuple[str, str, Image.Image | None, Rows]:
    if not ref:
        return "", "No adapter selected.", None, []
    adapter = _find(client.models(), ref)
    names = {label.label: label.text for label in adapter.labels}
    return views.adapter_markdown(adapter), *_report(client, adapter, names)


def _report(client: ApiClient, adapter: AdapterVersion, names: dict[str, str]) -> ReportView:
    """The report tab's contents; a missing report is a message there, not an error for the whole page."""
    try:
        report = client.report(adapter.name, adapter.version)
        png = client.confusion_png(adapter.name, adapter.version)
    except ApiError as exc:
        return f"No evaluation report for `{adapter.ref}`: {exc}", None, []
    return views.report_markdown(report, adapter.ref), Image.open(io.BytesIO(png)), views.report_rows(report, names)


def _find(models: ModelsResponse, ref: str) -> AdapterVersion:
    for adapter in models.adapters:
        if adapter.ref == ref:
            return adapter
    raise ApiError(f"The API no longer serves {ref}; press ↻ to reload the list.")


def build_ui(settings: UISettings, client: ApiClient | None = None) -> gr.Blocks:
    handlers = Handlers(client or ApiClient(settings.api_url, settings.timeout_s), settings)
    with gr.Blocks(title="petbreed") as demo:
        gr.Markdown(INTRO.format(api=settings.api_url))
        adapter, refresh, status, info = _adapter_row()
        with gr.Tab("Predict"):
            image, button, result, bar = _predict_tab(settings)
        with gr.Tab("Evaluation report"):
            report_md, confusion, table = _report_tab()
        gr.on([button.click, image.change], handlers.predict, [image, adapter], [bar, result], api_name="predict")
        gr.on([demo.load, refresh.click], handlers.load_adapters, None, [adapter, status], api_name="load_adapters")
        details = [info, report_md, confusion, table]
        adapter.change(handlers.adapter_details, adapter, details, api_name="adapter_details")
    return demo


def _adapter_row() -> tuple[gr.Dropdown, gr.Button, gr.Markdown, gr.Markdown]:
    with gr.Row(equal_height=True):
        adapter = gr.Dropdown(
            # Choices arrive per page load; API callers may name any adapter and the API validates it.
            label="Adapter (NAME@VERSION)", choices=[], allow_custom_value=True, elem_id="adapter", scale=4,
        )
        refresh = gr.Button("↻ reload adapters", elem_id="refresh", scale=1)
    status = gr.Markdown(elem_id="api-status")  # outside the accordion: "API down" must be seen
    with gr.Accordion("Adapter details: label set and metrics", open=False):
        info = gr.Markdown(elem_id="adapter-info")
    return adapter, refresh, status, info


def _predict_tab(settings: UISettings) -> tuple[gr.Image, gr.Button, gr.Markdown, gr.Label]:
    with gr.Row():
        with gr.Column():
            image = _raw_image(
                label="Pet photo", sources=["upload", "webcam", "clipboard"], elem_id="pet-image"
            )
            button = gr.Button("Predict breed", variant="primary", elem_id="predict")
            examples = example_images(settings.cache_dir)
            gr.Examples(
                [[str(path)] for path in examples], inputs=[image],
                label="Examples: synthetic pets of the demo breeds, and Chelsea the tabby (scikit-image, CC0)",
            )
        with gr.Column():
            result = gr.Markdown("Upload a photo (or pick an example) to see its breed.", elem_id="result")
            bar = gr.Label(
                label=f"Top {settings.top_k} breeds", num_top_classes=settings.top_k, show_heading=False,
                elem_id="top-k",
            )
    return image, button, result, bar


def _report_tab() -> tuple[gr.Markdown, gr.Image, gr.Dataframe]:
    report_md = gr.Markdown("Pick an adapter above to see its evaluation.", elem_id="report-summary")
    with gr.Row():
        confusion = gr.Image(
            label="Confusion matrix", type="pil", interactive=False, height=520, buttons=["download", "fullscreen"],
            elem_id="confusion",
        )
        table = gr.Dataframe(
            headers=views.REPORT_COLUMNS, label="Per-class scores", interactive=False, elem_id="per-class"
        )
    return report_md, confusion, table
