"""What the page shows, as pure functions of API answers: easy to test without a browser."""

from __future__ import annotations

from serve.schemas import AdapterVersion, ModelsResponse, PredictResponse
from ui.api_client import EvalReport

REPORT_COLUMNS = ["breed", "precision", "recall", "f1", "support"]


def prediction_markdown(response: PredictResponse) -> str:
    top = response.predictions[0]
    species = f" · {top.species}" if top.species else ""
    lines = [
        f"## {top.text}",
        f"**confidence {top.confidence:.1%}**{species}",
    ]
    if top.uncertain:
        lines.append(
            f"> **Uncertain**: confidence {top.confidence:.0%} is below the server's threshold. "
            "This may not be a pet, or not one of the breeds this adapter knows."
        )
    lines.append(f"adapter `{response.adapter}` · latency {response.latency_ms:.0f} ms")
    return "\n\n".join(lines)


def confidences(response: PredictResponse) -> dict[str, float]:
    """{display name: probability} for gr.Label, which draws it as the top-k bar."""
    return {score.text: score.probability for score in response.predictions[0].top_k}


def error_markdown(message: str) -> str:
    return f"### Could not classify this image\n\n{_plain(message)}"


def adapter_choices(models: ModelsResponse) -> tuple[list[str], str | None]:
    """Every NAME@VERSION, newest first, and the one to select (the server's default)."""
    refs = [a.ref for a in sorted(models.adapters, key=lambda a: (a.name, -a.version))]
    return refs, _default_ref(models, refs)


def _default_ref(models: ModelsResponse, refs: list[str]) -> str | None:
    default = models.default_adapter
    if default in refs:
        return default
    # The default may be a bare NAME, meaning its newest version (refs are sorted newest first).
    named = [ref for ref in refs if ref.partition("@")[0] == default]
    candidates = named or refs
    return candidates[0] if candidates else None


def adapter_markdown(adapter: AdapterVersion) -> str:
    metrics = " · ".join(f"{key} **{value:.3f}**" for key, value in sorted(adapter.metrics.items()))
    labels = ", ".join(f"{label.text} ({label.species})" if label.species else label.text for label in adapter.labels)
    state = "loaded" if adapter.loaded else "not loaded yet (first prediction loads it)"
    parent = f" · trained from `{adapter.parent}`" if adapter.parent else ""
    return (
        f"**`{adapter.ref}`** on `{adapter.base_model}` · {state} · created {adapter.created_at}{parent}\n\n"
        f"**Metrics:** {metrics or 'none recorded'}\n\n"
        f"**{len(adapter.labels)} breeds:** {labels}"
    )


def report_markdown(report: EvalReport, ref: str) -> str:
    return (
        f"## Evaluation of `{ref}`\n\n"
        f"**Accuracy {report.accuracy:.1%}** · **macro-F1 {report.macro_f1:.3f}** · {report.n} held-out images"
    )


def report_rows(report: EvalReport, names: dict[str, str]) -> list[list[object]]:
    return [
        [names.get(label, label), round(s.precision, 3), round(s.recall, 3), round(s.f1, 3), s.support]
        for label, s in report.per_class.items()
    ]


def split_ref(ref: str) -> tuple[str, int]:
    """'pets@3' -> ('pets', 3); raises ValueError for anything else."""
    name, _, version = ref.partition("@")
    return name, int(version)


def _plain(text: str) -> str:
    # The message comes from a server; keep it from opening HTML tags in the page.
    return text.replace("<", "&lt;").replace(">", "&gt;")
