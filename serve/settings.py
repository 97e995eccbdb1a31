"""Serving settings: one typed object filled from flags or `PETBREED_*` environment variables.

The platform variables are honoured too, so the same image runs unchanged on Cloud Run (`PORT`)
and as a Vertex AI custom container (`AIP_HTTP_PORT`, `AIP_PREDICT_ROUTE`, `AIP_HEALTH_ROUTE`).
The vLLM knobs are grouped under `vllm` (`PETBREED_VLLM__MAX_MODEL_LEN=256`); the backend (CPU
or CUDA) is whatever vLLM build is installed, never a code path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self

from pydantic import AliasChoices, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from adapter_contract.image import SoftTokens

# vLLM's online quantization schemes petbreed offers (the towers stay bf16 unless asked: `engine_args`).
Quantization = Literal["fp8_per_channel", "fp8_per_tensor", "fp8_per_block"]

# vLLM's LoRA kernel configurations tuned by bench/tune_lora_kernels.py, one file per GPU and kernel.
TUNED_LORA_KERNELS = Path(__file__).parent / "lora_kernel_configs"


class VllmSettings(BaseModel):
    """Engine arguments passed through to vLLM's AsyncEngineArgs (names as vLLM spells them)."""

    dtype: str = Field("auto", description="auto, float32, bfloat16, float16")
    enforce_eager: bool | None = Field(None, description="None: eager on CPU, CUDA graphs on GPU")
    torch_compile: bool = Field(
        False, description="with CUDA graphs: full graphs of the torch.compiled model instead of the eager model's; "
        "steps too large for a graph run compiled too. Alone, on one H100 merged with fp8 weights, about 1.05x "
        "saturated and nothing at concurrency 1. With fast_prefill it gives the prompt steps piecewise graphs: on "
        "one H100 167.1-172.8 against 149.8-161.1 images/s saturated and p50 44.4 against 122.7 ms at concurrency 1. "
        "A cold start compiles for minutes (ready after 357-392 against 169-230 s); vLLM keeps the compiled code in "
        "PETBREED_CACHE_DIR/vllm, keyed by the engine's settings, VLLM_* variables and (inductor's) the GPU's name; "
        "a start that found it was about as quick as the eager engine's (230 s without fast_prefill; 270 against "
        "263 s with it; docs/performance.md)"
    )
    quantization: Quantization | None = Field(
        None, description="vLLM's online quantization of the language model's weights while a bf16 checkpoint loads "
        "(fp8 multiplies on compute capability 8.9 and newer: L4, RTX PRO 6000, H100/H200; per vLLM's docs older GPUs "
        "store fp8 weights only, through Marlin); fp8_per_channel scales activations per token, as llmcompressor's "
        "FP8_DYNAMIC. The towers (unless quantize_vision_tower) and adapters stay bf16. On an H200 fp8_per_channel "
        "served 103-114 images/s saturated against 91-93 in bf16, c=1 unchanged; check the adapter's accuracy first "
        "(bench/bench_fp8_accuracy.py, docs/performance.md). None: the checkpoint's weights as they are"
    )
    quantize_vision_tower: bool = Field(
        False, description="with quantization: the vision tower's encoder layers are quantized as well (its patch "
        "embedder and projector stay bf16), where vLLM quantizes the tower at all (Gemma 4's E2B/E4B tower: "
        "dimensions divisible by 64). At 280 soft tokens those layers are about a quarter of an image's FLOPs. "
        "Check the adapter's accuracy first (bench/bench_fp8_accuracy.py --tower)"
    )
    fast_prefill: bool = Field(
        False, description="with merged_adapter: vLLM's kv_sharing_fast_prefill. Gemma 4's KV-shared layers (its "
        "last num_kv_shared_layers, 18 of E4B's 42) run only on the one position per prompt that is answered, not on "
        "the image's tokens. No full CUDA graph then holds a step with a prompt: alone it trades latency at low "
        "concurrency for saturated throughput; with torch_compile those steps get piecewise graphs, which keeps the "
        "throughput and a low latency at concurrency 1: on two H100s with a quick host CPU 162-189 images/s and p50 "
        "24-29 ms one request at a time, over HTTP (docs/performance.md)"
    )
    max_num_batched_tokens: int = Field(
        16384, ge=64, description="tokens per engine step; images per step is about this / (soft tokens + 30). "
        "vLLM's own default for an embedded engine (2048) caps a GPU at ~7 images per step"
    )
    max_model_len: int = Field(1024, ge=64, description="prompt + image soft tokens + answer prefix")
    max_loras: int = Field(4, ge=1, description="adapters in one batch at once")
    max_cpu_loras: int | None = Field(None, ge=1, description="adapters cached in host memory (LRU)")
    max_lora_rank: int = Field(64, ge=1, description="adapters with a larger rank are refused")
    max_num_seqs: int | None = Field(None, ge=1)
    lora_kernel_configs: Path | None = Field(
        None, description="folder of LoRA kernel configurations for vLLM (VLLM_TUNED_CONFIG_FOLDER, which wins if "
        "set); vLLM takes the files named for its GPU and keeps its defaults elsewhere. None: vLLM's defaults. "
        "petbreed's folder serve/lora_kernel_configs holds the H200's for Gemma 4 E4B (bench/tune_lora_kernels.py): "
        "1.59x faster expand and 1.68x shrink kernels at a 16,384-token step, but on one H200 engine 0-5 percent "
        "more saturated throughput, while Triton compiling them made a fresh server's first saturated load 30 "
        "percent slower"
    )
    graph_max_tokens: int = Field(
        1024, ge=0, description="with CUDA graphs: the largest engine step (tokens) captured in a graph, 3 images at "
        "280 soft tokens; larger steps run eagerly, launch-bound by the LoRA kernels. On an H200 (vLLM 0.24) 1024 "
        "took 8 requests at once from 20.7-27.2 to 37.8 images/s; as LoRA 2560 or more crashed the engine at "
        "start-up, merged 4096 started (docs/performance.md). Each size costs start-up. 0: vLLM's own (512 tokens, "
        "one image)"
    )
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    tensor_parallel_size: int = Field(1, ge=1)
    compile_vision_tower: bool | None = Field(
        None, description="torch.compile Gemma 4's vision tower in the engine (vLLM runs transformers' module "
        "eagerly; on an H200 compiling took a new image from 76 to 58 ms at concurrency 1 and raised saturated "
        "throughput 1.6x); None: with CUDA"
    )
    stack_images_on_cpu: bool = Field(
        True, description="vLLM's own copy of each engine step's images into one pinned CPU tensor before the "
        "vision tower. false hands them over one by one: on an H200, 8 requests at once went from 14.0 to 23.1 "
        "images/s, but 256 at once from 45.0 down to 36.4"
    )
    vision_graph_images: int = Field(
        1, ge=0, description="with CUDA and no tower LoRA: engine steps with up to this many images of one size run "
        "the vision tower from CUDA graphs (captured the first time a shape is seen) instead of launching its "
        "kernels from Python; 0: off. On an H200, with the tower compiled, one image took 3.3 ms replayed against "
        "9.4 ms without a graph; 8 images 19.7 against 20.4 (docs/performance.md). Graph memory comes on top "
        "of gpu_memory_utilization"
    )
    vision_attention: Literal["flash", "cudnn"] = Field(
        "flash", description="the attention kernel PyTorch runs in the vision tower on petbreed's image path: "
        "flash (FlashAttention 2, PyTorch's default) or cudnn (cuDNN's fused attention, which has Hopper "
        "kernels); cudnn falls back to the others where it cannot run"
    )
    uint8_pixels: bool = Field(
        True, description="images travel from the front-end to the engine as 8-bit patches and are rescaled to "
        "floats in the engine's worker, with the same result: the front-end's image processor skips its float "
        "arithmetic (decode + processor 2.9 instead of 5.4 ms per 448 px JPEG at 280 soft tokens, one CPU "
        "thread) and half the bytes cross between processes (H200: 1.61x the saturated throughput). Where the "
        "processor also normalises, its own output travels instead"
    )
    renderer_workers: int = Field(
        4, ge=1, description="threads of vLLM's renderer (renderer_num_workers), which run the image processor off "
        "the front-end's event loop (vLLM >= 0.32 uses one for images whatever this says)"
    )
    render_processes: int | None = Field(
        None, ge=0, description="processes that render prompts with images (the image processor and vLLM's "
        "placeholders) that arrive while another renders, instead of the renderer's threads, which hold the "
        "front-end's interpreter lock against its event loop (serve/render_pool.py); an image alone stays in the "
        "threads. Each loads the processor. 0: the threads only. None: 4 with CUDA, 0 on CPU, where the model "
        "itself needs the cores"
    )
    cpu_threads: int | None = Field(
        None, ge=1, description="torch's CPU threads in the front-end and the engine core (OMP_NUM_THREADS, which "
        "wins where set). With CUDA these processes run only small CPU work: image processing in several renderer "
        "threads and the copy of a step's images, each of which would fan out over every core and contend with "
        "the others; vLLM gives its multiprocess GPU workers 1 for the same reason. None: 1 with CUDA, untouched "
        "on CPU, where the model itself runs on those threads"
    )
    tower_lora: bool = Field(
        True, description="LoRA on the vision tower and projector, where vLLM supports it (>= 0.32). false: "
        "adapters with such weights are refused, and images take petbreed's image path (no padding patches; "
        "CUDA graphs with vision_graph_images), as on vLLM 0.24"
    )
    enable_prefix_caching: bool = True
    cpu_kvcache_space_gib: int = Field(1, ge=1, description="VLLM_CPU_KVCACHE_SPACE on the CPU build")
    max_soft_tokens: SoftTokens | None = Field(
        None, description="image token budget for every adapter, instead of the one its manifest says it was "
        "trained with (fewer is faster and may cost accuracy: docs/performance.md); None: each adapter's own, "
        "or the model's default for manifests that name none"
    )


def _env(name: str, *platform: str) -> AliasChoices:
    """The PETBREED_ name first, then the platform's, then the field name (init kwargs)."""
    return AliasChoices(f"PETBREED_{name.upper()}", *platform, name)


class ServeSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="PETBREED_", env_nested_delimiter="__", cli_kebab_case=True, populate_by_name=True,
        env_parse_none_str="null",  # e.g. PETBREED_VLLM__LORA_KERNEL_CONFIGS=null
    )

    base_model: str = Field("artifacts/tiny-gemma4", description="Hugging Face id, local folder or gs:// prefix")
    registry: str = Field("artifacts/registry", description="adapter registry: local folder or gs://bucket/prefix")
    default_adapter: str | None = Field("pets", description="adapter NAME used when a request names none")
    merged_adapter: str | None = Field(
        None, description="serve only this adapter NAME, its newest version merged into the base weights instead of "
        "applied as LoRA (serve/adapter_merge.py): no LoRA work in any engine step (on an H200 LoRA was 23 percent "
        "of a saturated step's GPU time and the base model alone 1.23x faster at concurrency 1), but no other "
        "adapter or version is served. A new version is merged in place, requests waiting meanwhile. It is also "
        "the default adapter"
    )
    cache_dir: Path = Field(Path(".cache/petbreed"), description="downloaded adapters and base models")
    poll_interval_s: float = Field(30.0, ge=0, description="registry index polling for new versions; 0: off")
    admin_token: SecretStr | None = Field(None, description="bearer token of POST /v1/admin/reload; unset: disabled")

    uncertain_below: float = Field(0.5, ge=0, le=1, description="confidence under this is answered `uncertain`")
    max_images: int = Field(8, ge=1, description="images per request")
    max_body_bytes: int = Field(20 * 1024 * 1024, ge=1024, description="request body limit (413 above)")
    max_pixels: int = Field(40_000_000, ge=1, description="per-image pixel limit, checked before decoding")
    queue_size: int = Field(64, ge=1, description="images in flight; more answers 429 with Retry-After")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429 and 503")

    host: str = "0.0.0.0"
    port: int = Field(8080, validation_alias=_env("port", "AIP_HTTP_PORT", "PORT"))
    predict_route: str = Field("/predict", validation_alias=_env("predict_route", "AIP_PREDICT_ROUTE"))
    health_route: str | None = Field(None, validation_alias=_env("health_route", "AIP_HEALTH_ROUTE"))
    log_level: str = "INFO"

    vllm: VllmSettings = VllmSettings()

    @model_validator(mode="after")
    def _queue_holds_a_request(self) -> Self:
        # A request is admitted whole, so one at the image limit must fit in an empty queue.
        if self.max_images > self.queue_size:
            raise ValueError(f"max_images ({self.max_images}) must not exceed queue_size ({self.queue_size})")
        for route in (self.predict_route, self.health_route):
            if route is not None and not route.startswith("/"):
                raise ValueError(f"route {route!r} must start with '/'")
        return self

    @model_validator(mode="after")
    def _tower_settings_apply(self) -> Self:
        # Tower LoRA (vLLM >= 0.32) runs vLLM's own image path, where the attention choice would do nothing.
        v = self.vllm
        if v.vision_attention != "flash" and v.tower_lora and self.merged_adapter is None:
            raise ValueError("vision_attention applies to petbreed's image path: set vllm.tower_lora to false, or "
                             "serve a merged_adapter")
        if v.fast_prefill and self.merged_adapter is None:
            # vLLM's LoRA kernels get the whole step's token mapping in layers that run on fewer tokens.
            raise ValueError("vllm.fast_prefill needs a merged_adapter: vLLM's LoRA kernels do not run on the "
                             "KV-shared layers' fewer positions")
        if v.quantize_vision_tower and v.quantization is None:
            raise ValueError("quantize_vision_tower needs a quantization scheme (vllm.quantization)")
        return self

    @model_validator(mode="after")
    def _merged_adapter_is_the_default(self) -> Self:
        if self.merged_adapter is not None:
            self.default_adapter = self.merged_adapter
        return self
