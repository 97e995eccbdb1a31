"""Serving settings: PETBREED_* variables, and the platform variables of Cloud Run and Vertex AI."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from serve.settings import ServeSettings, VllmSettings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("PORT", "AIP_HTTP_PORT", "AIP_PREDICT_ROUTE", "AIP_HEALTH_ROUTE", "PETBREED_PORT"):
        monkeypatch.delenv(name, raising=False)


def test_port_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    assert ServeSettings().port == 8080
    monkeypatch.setenv("PORT", "9001")  # Cloud Run
    assert ServeSettings().port == 9001
    monkeypatch.setenv("AIP_HTTP_PORT", "9002")  # Vertex AI
    assert ServeSettings().port == 9002
    monkeypatch.setenv("PETBREED_PORT", "9003")  # ours, explicit, wins
    assert ServeSettings().port == 9003
    assert ServeSettings(port=9004).port == 9004


def test_vertex_routes_and_nested_vllm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIP_PREDICT_ROUTE", "/v1/endpoints/1/deployedModels/2:predict")
    monkeypatch.setenv("AIP_HEALTH_ROUTE", "/health")
    monkeypatch.setenv("PETBREED_VLLM__MAX_MODEL_LEN", "256")
    monkeypatch.setenv("PETBREED_ADMIN_TOKEN", "s3cret")
    s = ServeSettings()
    assert (s.predict_route, s.health_route) == ("/v1/endpoints/1/deployedModels/2:predict", "/health")
    assert s.vllm.max_model_len == 256
    assert s.admin_token is not None and "s3cret" not in repr(s)


def test_a_request_at_the_image_limit_must_fit_the_queue() -> None:
    with pytest.raises(ValidationError, match="queue_size"):
        ServeSettings(max_images=8, queue_size=4)


def test_the_towers_attention_is_chosen_only_where_petbreeds_image_path_runs() -> None:
    with pytest.raises(ValidationError, match="tower_lora"):
        ServeSettings(vllm=VllmSettings(vision_attention="cudnn"))
    assert ServeSettings(vllm=VllmSettings(tower_lora=False, vision_attention="cudnn"))
    assert ServeSettings(merged_adapter="pets", vllm=VllmSettings(vision_attention="cudnn"))


@pytest.mark.parametrize(("torch_compile", "mode"), [(False, 0), (True, 3)])
def test_with_cuda_the_model_runs_in_full_cuda_graphs_compiled_only_if_asked(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, torch_compile: bool, mode: int
) -> None:
    from serve import engine

    monkeypatch.setattr(engine, "_has_cuda", lambda: True)
    args = engine.engine_args(ServeSettings(vllm=VllmSettings(torch_compile=torch_compile)), str(tiny_model))
    assert not args.enforce_eager
    assert (args.compilation_config.mode, args.compilation_config.cudagraph_mode.name) == (mode, "FULL")


@pytest.mark.parametrize(("torch_compile", "graphs"), [(False, "FULL_DECODE_ONLY"), (True, "FULL_AND_PIECEWISE")])
def test_with_fast_prefill_no_full_graph_holds_a_prompt(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path, torch_compile: bool, graphs: str
) -> None:
    """A full graph would replay the KV-shared layers' attention metadata of its capture."""
    from serve import engine

    monkeypatch.setattr(engine, "_has_cuda", lambda: True)
    settings = ServeSettings(merged_adapter="pets", vllm=VllmSettings(fast_prefill=True, torch_compile=torch_compile))
    args = engine.engine_args(settings, str(tiny_model))
    assert args.kv_sharing_fast_prefill
    assert args.compilation_config.cudagraph_mode.name == graphs
    assert not engine.engine_args(ServeSettings(merged_adapter="pets"), str(tiny_model)).kv_sharing_fast_prefill


def test_fast_prefill_needs_a_merged_adapter() -> None:
    with pytest.raises(ValidationError, match="fast_prefill needs a merged_adapter"):
        ServeSettings(vllm=VllmSettings(fast_prefill=True))


def test_graph_max_tokens_sets_the_largest_cuda_graph(monkeypatch: pytest.MonkeyPatch, tiny_model: Path) -> None:
    from serve import engine

    monkeypatch.setattr(engine, "_has_cuda", lambda: True)
    own = engine.engine_args(ServeSettings(vllm=VllmSettings(graph_max_tokens=0)), str(tiny_model))
    assert not own.compilation_config.cudagraph_capture_sizes  # vLLM's own ladder
    sizes = engine.engine_args(ServeSettings(vllm=VllmSettings(graph_max_tokens=2500)),
                               str(tiny_model)).compilation_config.cudagraph_capture_sizes
    assert sizes == sorted(set(sizes)) and sizes[:3] == [1, 2, 4] and sizes[-1] == 2500
    assert {304, 512, 1024, 2432} <= set(sizes)


def test_fp8_quantizes_the_language_model_and_leaves_the_towers_in_bf16(tiny_model: Path) -> None:
    # What vLLM's online quantization asks of each linear layer's name.
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    from serve import engine

    assert engine.engine_args(ServeSettings(), str(tiny_model)).quantization is None
    args = engine.engine_args(ServeSettings(vllm=VllmSettings(quantization="fp8_per_channel")), str(tiny_model))
    assert args.quantization == "fp8_per_channel" and args.quantization_config.linear is not None
    ignore = args.quantization_config.ignore  # resolved by vLLM with the shorthand
    for tower in ("vision_tower.encoder.layers.0.mlp.up_proj.linear", "vision_tower.patch_embedder.input_proj",
                  "model.embed_vision.embedding_projection", "audio_tower.layers.3.ffw.linear"):
        assert should_ignore_layer(tower, ignore), tower
    for language in ("language_model.model.layers.0.mlp.gate_up_proj", "language_model.layers.7.self_attn.qkv_proj"):
        assert not should_ignore_layer(language, ignore), language
    with pytest.raises(ValidationError, match="quantization"):
        VllmSettings(quantization="int4")  # type: ignore[arg-type]


def test_the_vision_towers_encoder_layers_can_be_quantized_too(tiny_model: Path) -> None:
    from vllm.model_executor.layers.quantization.compressed_tensors.utils import should_ignore_layer

    from serve import engine

    settings = ServeSettings(vllm=VllmSettings(quantization="fp8_per_channel", quantize_vision_tower=True))
    ignore = engine.engine_args(settings, str(tiny_model)).quantization_config.ignore
    for layer in ("vision_tower.encoder.layers.0.mlp.up_proj.linear", "model.language_model.layers.0.mlp.up_proj",
                  "model.vision_tower.encoder.layers.15.self_attn.o_proj.linear"):
        assert not should_ignore_layer(layer, ignore), layer
    for kept in ("vision_tower.patch_embedder.input_proj", "model.vision_tower.patch_embedder.input_proj",
                 "model.embed_vision.embedding_projection", "audio_tower.layers.3.ffw.linear",
                 "model.embed_audio.embedding_projection"):
        assert should_ignore_layer(kept, ignore), kept
    with pytest.raises(ValidationError, match="quantization scheme"):
        ServeSettings(vllm=VllmSettings(quantize_vision_tower=True))


def test_a_merged_adapter_is_the_default_and_its_engine_has_no_lora(
    monkeypatch: pytest.MonkeyPatch, tiny_model: Path
) -> None:
    from serve import engine

    monkeypatch.setenv("PETBREED_MERGED_ADAPTER", "cats")
    settings = ServeSettings(default_adapter="pets")
    assert settings.default_adapter == "cats"
    args = engine.engine_args(settings, str(tiny_model))
    assert not args.enable_lora and not args.enable_tower_connector_lora
    assert engine.tower_lora(settings)  # its tower weights are merged like the rest
    assert engine.engine_args(ServeSettings(merged_adapter=None), str(tiny_model)).enable_lora


def test_the_engine_takes_images_only(tiny_model: Path) -> None:
    """No audio and no video: vLLM then skips an E2B/E4B checkpoint's audio tower and sizes the
    encoder's memory by images, the largest item it would otherwise profile being an audio clip."""
    from serve import engine

    limits = engine.engine_args(ServeSettings(), str(tiny_model)).limit_mm_per_prompt
    assert limits == {"image": 1, "video": 0, "audio": 0}
