"""ui.views: what the page says for an answer, without a server or a browser."""

from __future__ import annotations

from serve.schemas import ModelsResponse, PredictResponse
from ui import views


def _response(confidence: float, uncertain: bool) -> PredictResponse:
    top = {"label": "pug", "text": "Pug", "species": "dog", "probability": confidence}
    other = {"label": "beagle", "text": "Beagle", "species": "dog", "probability": 1 - confidence}
    return PredictResponse.model_validate({
        "adapter": "pets@2", "latency_ms": 41.6,
        "predictions": [{**top, "confidence": confidence, "uncertain": uncertain, "top_k": [top, other]}],
    })


def test_prediction_shows_breed_species_confidence_adapter_latency() -> None:
    text = views.prediction_markdown(_response(0.873, uncertain=False))
    for part in ("## Pug", "confidence 87.3%", "dog", "`pets@2`", "latency 42 ms"):
        assert part in text
    assert "Uncertain" not in text
    assert views.confidences(_response(0.873, False)) == {"Pug": 0.873, "Beagle": 1 - 0.873}


def test_low_confidence_says_uncertain() -> None:
    assert "Uncertain" in views.prediction_markdown(_response(0.31, uncertain=True))


def _models(default: str | None, versions: list[int]) -> ModelsResponse:
    adapter: dict[str, object] = {"name": "pets", "base_model": "tiny", "labels": [], "metrics": {}, "parent": None,
               "created_at": "2026-11-28", "loaded": True}
    return ModelsResponse.model_validate({"base_model": "tiny", "default_adapter": default, "adapters": [
        {**adapter, "version": v, "ref": f"pets@{v}"} for v in versions
    ]})


def test_adapter_choices_newest_first_and_default_selected() -> None:
    assert views.adapter_choices(_models("pets@1", [1, 2])) == (["pets@2", "pets@1"], "pets@1")
    assert views.adapter_choices(_models("pets", [1, 3, 2])) == (["pets@3", "pets@2", "pets@1"], "pets@3")
    assert views.adapter_choices(_models(None, [])) == ([], None)


def test_server_text_cannot_inject_html() -> None:
    assert "<script>" not in views.error_markdown("bad <script>alert(1)</script>")
