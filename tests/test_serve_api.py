"""The prediction API against the real vLLM CPU engine: one server process for the whole module.

The server is `python -m serve.cli` (what `petbreed serve` runs) on the tiny Gemma 4, serving
`pets@1` trained by `petbreed train`, a second adapter `cats@1`, and `alien@1` whose manifest
names another base model. Vertex AI's and Cloud Run's variables are set to show they are honoured.
"""

from __future__ import annotations

import base64
import io
import json
import random
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from adapter_contract.labels import LabelSet
from adapter_contract.manifest import AdapterManifest
from adapter_contract.registry import Registry
from finetune.data import load_dataset, load_image
from finetune.model import LoraSettings
from finetune.synthetic import BREEDS
from finetune.tiny_model import make_random_adapter, publish_random_adapter
from tests.conftest import free_port, running_server

TOKEN = "test-admin-token"
# A random adapter on the language model only: it takes petbreed's image path whatever the vLLM.
LM_ONLY = LoraSettings(r=8, alpha=16, targets=r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)")
MAX_IMAGES = 4
LIMITS = {"PETBREED_MAX_IMAGES": "4", "PETBREED_QUEUE_SIZE": "4", "PETBREED_MAX_BODY_BYTES": "2000000",
          "PETBREED_MAX_PIXELS": "1000000"}


def random_adapter(tiny_model: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random (non-zero) weights on every linear layer, vision tower included."""
    return make_random_adapter(tiny_model, out, LoraSettings(r=8, alpha=16), std=0.3, seed=seed)


def publish_like(registry: Registry, template: AdapterManifest, adapter: Path, **update: object) -> AdapterManifest:
    return registry.publish(adapter, template.model_copy(update=update))


@pytest.fixture(scope="module")
def registry_uri(trained_registry: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A copy of the trained registry, plus a second adapter and one trained on another base."""
    root = tmp_path_factory.mktemp("serve")
    uri = str(root / "registry")
    shutil.copytree(trained_registry, uri)
    registry = Registry(uri)
    pets = registry.manifest("pets", 1)
    cats = random_adapter(tiny_model, root / "cats", seed=1)
    publish_like(registry, pets, cats, name="cats", labels=LabelSet(labels=BREEDS[2:6]), metrics={})
    alien_base = pets.base_model.model_copy(update={"id": "google/gemma-4-E4B-it", "config_sha256": "0" * 64})
    publish_like(registry, pets, random_adapter(tiny_model, root / "alien", seed=2), name="alien",
                 base_model=alien_base)
    return uri


@pytest.fixture(scope="module")
def server(registry_uri: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """The real server process. Yields its URL, its log file and what /readyz said while loading."""
    port = free_port()
    env = {
        "PETBREED_REGISTRY": registry_uri, "PETBREED_ADMIN_TOKEN": TOKEN, "PETBREED_POLL_INTERVAL_S": "2",
        "PETBREED_UNCERTAIN_BELOW": "0.5", "AIP_HTTP_PORT": str(port), "AIP_PREDICT_ROUTE": "/vertex/predict",
        "AIP_HEALTH_ROUTE": "/vertex/health", "PORT": "1", **LIMITS,
    }
    with running_server(tiny_model, env, port, tmp_path_factory.mktemp("serve-api")) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: dict) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server["url"], timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def test_images(synthetic_data: Path, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, Path]]:
    """One held-out synthetic image per breed: (label id, JPEG path)."""
    dataset = load_dataset(str(synthetic_data), tmp_path_factory.mktemp("cache"))
    first: dict[str, Path] = {}
    for ex in dataset.test:
        first.setdefault(ex.label, ex.path)
    return sorted(first.items())


def jpeg(path: Path) -> bytes:
    return path.read_bytes()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predict_files(client: httpx.Client, images: list[bytes], **fields: str) -> httpx.Response:
    files = [("file", (f"img{i}.jpg", data, "image/jpeg")) for i, data in enumerate(images)]
    return client.post("/v1/predict", files=files, data=fields)


def full_distribution(prediction: dict) -> dict[str, float]:
    return {score["label"]: score["probability"] for score in prediction["top_k"]}


def assert_same_answers(got: list[dict], expected: list[dict]) -> None:
    """Equal up to float noise: batch composition changes the order of float additions."""
    assert len(got) == len(expected)
    for a, b in zip(got, expected, strict=True):
        assert full_distribution(a) == pytest.approx(full_distribution(b), abs=1e-5)


def server_logs(server: dict) -> list[dict]:
    return [json.loads(line) for line in server["log"].read_text().splitlines() if line.startswith('{"time"')]


def assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    assert body["error"]["message"]
    return dict(body["error"])


# --- readiness, liveness, docs -------------------------------------------------------------------


def test_ready_only_once_the_engine_is_loaded(server: dict, client: httpx.Client) -> None:
    assert server["loading"], "the server should answer /readyz while the engine loads"
    for response in server["loading"]:
        assert_error(response, 503, "not_ready")
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").status_code == 200
    assert client.get("/vertex/health").status_code == 200  # AIP_HEALTH_ROUTE


def test_openapi_documents_every_route(client: httpx.Client) -> None:
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for route in ("/v1/predict", "/predict", "/vertex/predict", "/v1/models", "/healthz", "/readyz", "/metrics"):
        assert route in paths
    body = paths["/v1/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)


# --- predictions through every route -------------------------------------------------------------


def test_multipart_batch_gives_distributions_that_sum_to_one(
    client: httpx.Client, test_images: list[tuple[str, Path]]
) -> None:
    images = [jpeg(path) for _, path in test_images[:3]]
    response = predict_files(client, images, adapter="pets@1", top_k="6")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["adapter"] == "pets@1" and len(body["predictions"]) == 3
    for prediction in body["predictions"]:
        probs = [s["probability"] for s in prediction["top_k"]]
        assert len(probs) == 6 and abs(sum(probs) - 1) < 1e-6
        assert probs == sorted(probs, reverse=True)
        assert prediction["label"] == prediction["top_k"][0]["label"]
        assert prediction["confidence"] == probs[0]
        assert prediction["uncertain"] == (probs[0] < 0.5)


def test_every_route_gives_the_same_answer(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    data = jpeg(test_images[0][1])
    multipart = predict_files(client, [data], adapter="pets@1", top_k="6").json()["predictions"][0]
    as_json = client.post("/v1/predict", json={"images": [{"b64": b64(data)}], "adapter": "pets@1", "top_k": 6})
    vertex_body = {"instances": [{"image": {"bytesBase64Encoded": b64(data)}}],
                   "parameters": {"adapter": "pets@1", "top_k": 6}}
    answers = [multipart, as_json.json()["predictions"][0]]
    for route in ("/predict", "/vertex/predict"):  # /predict and AIP_PREDICT_ROUTE
        response = client.post(route, json=vertex_body)
        assert response.status_code == 200, response.text
        assert response.json()["adapter"] == "pets@1"
        answers.append(response.json()["predictions"][0])
    for other in answers[1:]:
        assert full_distribution(other) == pytest.approx(full_distribution(multipart), abs=1e-9)


def test_a_top_1_answer_is_the_full_distributions_winner_with_its_probability(
    client: httpx.Client, test_images: list[tuple[str, Path]]
) -> None:
    """With top_k=1 the server may skip deeper label-trie nodes; what it answers must not change."""
    for _, path in test_images[:4]:
        full = predict_files(client, [jpeg(path)], adapter="pets@1", top_k="6").json()["predictions"][0]
        one = predict_files(client, [jpeg(path)], adapter="pets@1", top_k="1").json()["predictions"][0]
        assert one["label"] == full["label"]
        assert one["confidence"] == pytest.approx(full["confidence"], abs=1e-6)


def test_top_k_limits_the_list(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    response = predict_files(client, [jpeg(test_images[0][1])], adapter="pets@1", top_k="2")
    assert len(response.json()["predictions"][0]["top_k"]) == 2
    many = predict_files(client, [jpeg(test_images[0][1])], adapter="pets@1", top_k="100")
    assert len(many.json()["predictions"][0]["top_k"]) == 6  # never more than the label set


def test_default_adapter_is_the_newest_pets(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    response = predict_files(client, [jpeg(test_images[0][1])])
    newest = max(a["version"] for a in client.get("/v1/models").json()["adapters"] if a["name"] == "pets")
    assert response.json()["adapter"] == f"pets@{newest}"


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "GIF", "BMP"])
def test_other_accepted_formats(client: httpx.Client, test_images: list[tuple[str, Path]], fmt: str) -> None:
    buf = io.BytesIO()
    load_image(test_images[0][1]).save(buf, format=fmt)
    response = predict_files(client, [buf.getvalue()], adapter="pets@1")
    assert response.status_code == 200, response.text


# --- parity with transformers + PEFT -------------------------------------------------------------


def test_parity_with_transformers_peft(
    client: httpx.Client, registry_uri: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    assert_accurate(assert_parity(client, registry_uri, tiny_model, test_images, tmp_path), test_images)


def test_parity_with_a_compiled_vision_tower_and_render_processes(
    trained_registry: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """GPU defaults forced on here: a compiled vision tower (`compile_vision_tower`) and prompts
    rendered in processes of their own (`render_processes`); and a step's images handed to the tower
    one by one (`stack_images_on_cpu` off): same answers. The compiled code is kept in the cache
    folder, for the next start. An image alone renders in the server's own threads; of images that
    arrive together, all but the first go to the processes."""
    port = free_port()
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # petbreed's default, not this process's
    env = {"PETBREED_REGISTRY": trained_registry, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0",
           "PETBREED_VLLM__COMPILE_VISION_TOWER": "true", "PETBREED_VLLM__STACK_IMAGES_ON_CPU": "false",
           "PETBREED_VLLM__RENDER_PROCESSES": "2"}
    with running_server(tiny_model, env, port, tmp_path) as server, \
            httpx.Client(base_url=str(server["url"]), timeout=120) as client:
        assert_accurate(assert_parity(client, trained_registry, tiny_model, test_images, tmp_path), test_images)
        alone = _stages_of_one_request(client, [test_images[0][1]])
        together = _stages_of_one_request(client, [path for _, path in test_images[:3]])
        log = Path(str(server["log"])).read_text()
    assert '"processes": 2' in log and "render processes started" in log
    assert alone["render"] == 1 and "render_process" not in alone
    assert together["render"] == 1 and together["render_process"] == 2
    inductor = tmp_path / "cache" / "inductor"  # running_server's PETBREED_CACHE_DIR
    assert any(inductor.rglob("*.py")), "the engine compiled nothing there"  # inductor's generated kernels


def test_parity_on_petbreeds_image_path_with_images_of_several_shapes(
    tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """`tower_lora` off, as on vLLM 0.24: images go through the tower without their padding patches,
    one call per patch count, and a language-model-only adapter answers as transformers + PEFT do.
    Each image has another shape (so another patch count) and they arrive in one request. cuDNN's
    attention is asked for first (`vision_attention`), which on a CPU falls back to the others."""
    shaped = []
    for (label, path), size in zip(test_images, [(96, 64), (64, 96), (80, 80), (120, 40), (50, 70), (64, 64)],
                                   strict=True):
        out = tmp_path / f"{label}.jpg"
        Image.open(path).convert("RGB").resize(size).save(out)
        shaped.append((label, out))
    env = {"PETBREED_VLLM__TOWER_LORA": "false", "PETBREED_VLLM__VISION_ATTENTION": "cudnn"}
    with random_adapter_server(tiny_model, LM_ONLY, env, tmp_path) as (registry, client, _):
        assert_parity(client, registry, tiny_model, shaped, tmp_path)


def test_a_checkpoint_with_an_audio_tower_serves_its_adapters_and_refuses_audio_lora(
    test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """The released E2B/E4B checkpoints carry an audio tower, which the server has vLLM skip. An
    adapter made by petbreed's LoRA code (which leaves that tower out) answers as transformers +
    PEFT do; one with LoRA weights on the audio tower is refused, and the reason says so."""
    import torch
    from peft import LoraConfig, get_peft_model

    from finetune.model import load_base
    from finetune.tiny_model import TinyModelConfig, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny-audio", TinyModelConfig(audio=True))
    registry = str(tmp_path / "registry")
    publish_random_adapter(model, registry, LabelSet(labels=BREEDS[:6]), LoraSettings(r=8, alpha=16), std=0.3)
    heard = tmp_path / "with-audio"
    every_linear = LoraConfig(r=8, target_modules="all-linear")  # PEFT's own, audio tower included
    get_peft_model(load_base(str(model), torch.device("cpu")), every_linear).save_pretrained(str(heard))
    publish_like(Registry(registry), Registry(registry).manifest("pets", 1), heard, name="heard")
    port = free_port()
    env = {"PETBREED_REGISTRY": registry, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0"}
    with running_server(model, env, port, tmp_path) as server, \
            httpx.Client(base_url=str(server["url"]), timeout=120) as client:
        assert_parity(client, registry, model, test_images, tmp_path)
        refused = {a["ref"]: a for a in client.get("/v1/models").json()["adapters"]}["heard@1"]
    assert not refused["loaded"] and "LoRA weights on the audio tower" in refused["refused_reason"]


def test_a_merged_adapter_answers_as_transformers_peft_and_a_new_version_is_merged_in_its_place(
    trained_registry: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """`merged_adapter`: the newest pets merged into the base weights, an engine without LoRA, answers
    as transformers + PEFT do with the adapter. A new version (another label set) is merged in its
    place without a restart and answers as PEFT does with it; the version it replaced and any other
    adapter are not served."""
    uri = str(tmp_path / "registry")
    shutil.copytree(trained_registry, uri)
    registry = Registry(uri)
    pets = registry.manifest("pets", 1)
    publish_like(registry, pets, random_adapter(tiny_model, tmp_path / "cats", seed=1), name="cats", metrics={})
    port = free_port()
    env = {"PETBREED_REGISTRY": uri, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0",
           "PETBREED_MERGED_ADAPTER": "pets", "PETBREED_DEFAULT_ADAPTER": "cats", "PETBREED_ADMIN_TOKEN": TOKEN}
    with running_server(tiny_model, env, port, tmp_path) as server, \
            httpx.Client(base_url=str(server["url"]), timeout=120) as client:
        assert_accurate(assert_parity(client, uri, tiny_model, test_images, tmp_path), test_images)
        assert_error(predict_files(client, [jpeg(test_images[0][1])], adapter="cats"), 404, "unknown_adapter")
        new = publish_like(registry, pets, random_adapter(tiny_model, tmp_path / "v2", seed=3),
                           labels=LabelSet(labels=BREEDS[:5]), metrics={})
        assert client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert_parity(client, uri, tiny_model, test_images, tmp_path, ref=new.ref)
        assert predict_files(client, [jpeg(test_images[0][1])]).json()["adapter"] == new.ref
        assert_error(predict_files(client, [jpeg(test_images[0][1])], adapter="pets@1"), 404, "unknown_adapter")
        log = Path(str(server["log"])).read_text()
    assert '"adapter merged"' in log.replace("'", '"') and new.ref in log


def test_fast_prefill_answers_as_transformers_peft(test_images: list[tuple[str, Path]], tmp_path: Path) -> None:
    """`fast_prefill`: a merged adapter on a model whose last layers share the KV of earlier ones,
    which then run only on each prompt's answered position, answers as transformers + PEFT do, with
    several images in one engine step."""
    from finetune.tiny_model import TinyModelConfig, make_tiny_model

    model = make_tiny_model(tmp_path / "kv-shared", TinyModelConfig(shape="tiny-kv"))
    env = {"PETBREED_MERGED_ADAPTER": "pets", "PETBREED_VLLM__FAST_PREFILL": "true"}
    with random_adapter_server(model, LoraSettings(r=8, alpha=16), env, tmp_path) as (registry, client, server):
        assert_parity(client, registry, model, test_images, tmp_path)
        log = Path(str(server["log"])).read_text()
    assert "--kv-sharing-fast-prefill" in log  # vLLM's own warning: the engine took the setting


def test_requests_the_engine_aborts_when_it_stops_answer_503_and_the_server_stops_being_ready(
    trained_registry: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """vLLM's engine core, signalled (Ctrl+C and `timeout` signal it with the server), aborts the
    requests it holds and refuses new ones (an image's next trie round). Those requests answer 503
    `request_aborted`, not 500; the rest get their answers or 503 `not_ready` once the server has
    seen the engine die, and /healthz then asks for a restart."""
    port = free_port()
    env = {"PETBREED_REGISTRY": trained_registry, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0"}
    requests = [[jpeg(path) for _, path in test_images[:MAX_IMAGES]]] * 12
    with running_server(tiny_model, env, port, tmp_path) as server, \
            httpx.Client(base_url=str(server["url"]), timeout=120) as client, ThreadPoolExecutor(len(requests)) as pool:
        process = server["process"]
        assert isinstance(process, subprocess.Popen)
        [engine_core] = [p for p in psutil.Process(process.pid).children() if "EngineCore" in " ".join(p.cmdline())]
        warm_up = _stage_counts(client).get("round1", 0)
        replies = [pool.submit(predict_files, client, images) for images in requests]
        # Once one image has had its first round, the engine is at work on the others.
        _wait_until(lambda: _stage_counts(client).get("round1", 0) > warm_up)
        engine_core.send_signal(signal.SIGTERM)
        answers = [reply.result() for reply in replies]
        _wait_until(lambda: client.get("/healthz").status_code != 200)
        health = client.get("/healthz")
    outcomes = [(a.status_code, a.json().get("error", {}).get("code")) for a in answers]
    assert (503, "request_aborted") in outcomes, outcomes
    assert set(outcomes) <= {(200, None), (503, "request_aborted"), (503, "not_ready")}, outcomes
    for answer in answers:
        if answer.status_code == 503:
            assert_error(answer, 503, answer.json()["error"]["code"])
            assert answer.headers["Retry-After"]
    assert health.status_code == 503


@contextmanager
def random_adapter_server(model: Path, lora: LoraSettings, env: dict[str, str],
                          tmp_path: Path) -> Iterator[tuple[str, httpx.Client, dict]]:
    """A server of `model` with these settings, whose registry holds a random 6-breed `pets@1`;
    yields the registry, a client of the server and the server."""
    registry = str(tmp_path / "registry")
    publish_random_adapter(model, registry, LabelSet(labels=BREEDS[:6]), lora, std=0.3)
    port = free_port()
    env = {"PETBREED_REGISTRY": registry, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0", **env}
    with running_server(model, env, port, tmp_path) as server, \
            httpx.Client(base_url=str(server["url"]), timeout=120) as client:
        yield registry, client, server


def assert_accurate(served: list[dict], test_images: list[tuple[str, Path]]) -> None:
    """The trained adapter is accurate on held-out images, through the server too."""
    correct = sum(p["label"] == label for p, (label, _) in zip(served, test_images, strict=True))
    assert correct >= 5


def assert_parity(client: httpx.Client, registry_uri: str, tiny_model: Path, test_images: list[tuple[str, Path]],
                  tmp_path: Path, ref: str = "pets@1") -> list[dict]:
    """The server's distributions for adapter `ref` are transformers + PEFT's on the same images, to
    1e-4. Returns them."""
    import torch

    from adapter_contract.prompt import ClassificationPrompt
    from finetune.model import load_adapter, load_base, load_processor
    from finetune.scoring import label_distributions

    registry = Registry(registry_uri)
    name, version = ref.split("@")
    folder = tmp_path / ref.replace("@", "")
    manifest = registry.download(name, int(version), folder)
    processor = load_processor(str(tiny_model))
    prompt = ClassificationPrompt.build(processor, manifest.labels)
    model = load_adapter(load_base(str(tiny_model), torch.device("cpu")), folder).eval()
    paths = [path for _, path in test_images]
    reference = label_distributions(model, processor, prompt, [load_image(p) for p in paths], torch.device("cpu"))

    top_k = str(len(manifest.labels.ids))
    served = predict_files(client, [jpeg(p) for p in paths[:4]], adapter=ref, top_k=top_k).json()["predictions"]
    served += predict_files(client, [jpeg(p) for p in paths[4:]], adapter=ref, top_k=top_k).json()["predictions"]
    assert len(served) == len(reference) == 6
    for prediction, probs in zip(served, reference, strict=True):
        expected = dict(zip(manifest.labels.ids, probs, strict=True))
        assert prediction["label"] == max(expected, key=expected.__getitem__)
        assert full_distribution(prediction) == pytest.approx(expected, abs=1e-4)
    return list(served)


# --- adapters: side by side, refusal, hot reload -------------------------------------------------


def test_two_adapters_side_by_side(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    data = jpeg(test_images[0][1])
    with ThreadPoolExecutor(4) as pool:
        jobs = [pool.submit(predict_files, client, [data], adapter=ref, top_k="10") for ref in ["pets@1", "cats"] * 2]
        answers = [job.result() for job in jobs]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    pets, cats = answers[0].json(), answers[1].json()
    assert cats["adapter"] == "cats@1"
    assert set(full_distribution(pets["predictions"][0])) == {b.id for b in BREEDS[:6]}
    assert set(full_distribution(cats["predictions"][0])) == {b.id for b in BREEDS[2:6]}
    assert sum(full_distribution(cats["predictions"][0]).values()) == pytest.approx(1, abs=1e-6)
    assert_same_answers(answers[2].json()["predictions"], pets["predictions"])  # deterministic, batched or not
    assert_same_answers(answers[3].json()["predictions"], cats["predictions"])


def test_models_lists_adapters_and_the_refused_one(client: httpx.Client, registry_uri: str) -> None:
    models = client.get("/v1/models").json()
    by_ref = {a["ref"]: a for a in models["adapters"]}
    assert by_ref["pets@1"]["loaded"] and by_ref["cats@1"]["loaded"]
    assert by_ref["pets@1"]["metrics"]["accuracy"] >= 0.85
    assert [x["label"] for x in by_ref["pets@1"]["labels"]] == Registry(registry_uri).manifest("pets", 1).labels.ids
    alien = by_ref["alien@1"]
    assert not alien["loaded"] and "config sha256" in alien["refused_reason"]
    assert models["default_adapter"].startswith("pets@")


def test_the_engine_is_warmed_up_before_it_reports_ready(server: dict) -> None:
    """vLLM's first image request loads the processor and compiles kernels: a client must not pay.
    pets@1 and cats@1 share an image budget, so one warm-up serves both."""
    logs = server_logs(server)
    messages = [r["message"] for r in logs]
    warmed = [r for r in logs[: messages.index("ready")] if r["message"] == "warmed up"]
    assert [r["adapter"] for r in warmed] in (["pets@1"], ["cats@1"])


def test_mismatched_adapter_is_refused_with_a_clear_error(client: httpx.Client, server: dict) -> None:
    data = io.BytesIO()
    Image.new("RGB", (32, 32), "red").save(data, format="PNG")
    error = assert_error(predict_files(client, [data.getvalue()], adapter="alien"), 404, "adapter_refused")
    assert "google/gemma-4-E4B-it" in error["message"] and "config sha256" in error["message"]
    logs = server_logs(server)
    assert any(r["message"] == "adapter refused" and r.get("adapter") == "alien@1" for r in logs)


def test_a_version_over_the_engines_image_budget_is_refused_and_the_engine_serves_on(
    client: httpx.Client, registry_uri: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """With LoRA on the vision tower, vLLM sizes the tower for the engine's budget (the tiny model's
    70 here) and ends its engine core on a larger image: such a version must be refused at load."""
    registry = Registry(registry_uri)
    larger = publish_like(registry, registry.manifest("cats", 1), random_adapter(tiny_model, tmp_path / "v", seed=6),
                          image_soft_tokens=140, metrics={})
    client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    data = jpeg(test_images[0][1])
    error = assert_error(predict_files(client, [data], adapter=larger.ref), 404, "adapter_refused")
    assert "140 soft tokens" in error["message"]
    assert predict_files(client, [data], adapter="pets@1").status_code == 200


def test_admin_reload_serves_a_new_version_without_restart(
    client: httpx.Client, registry_uri: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    registry = Registry(registry_uri)
    v1 = registry.manifest("pets", 1)
    published = publish_like(registry, v1, random_adapter(tiny_model, tmp_path / "v2", seed=3), metrics={})
    assert_error(client.post("/v1/admin/reload"), 401, "unauthorized")
    assert_error(client.post("/v1/admin/reload", headers={"Authorization": "Bearer wrong"}), 401, "unauthorized")
    reloaded = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
    assert reloaded.status_code == 200, reloaded.text
    # This server also polls every 2 s, so the poller may have added the version a moment before
    # the reload did; either way it must be served now, without a restart.
    served = {a["ref"] for a in client.get("/v1/models").json()["adapters"] if a["loaded"]}
    assert published.ref in served, reloaded.text
    data = jpeg(test_images[0][1])
    newest = predict_files(client, [data], top_k="6").json()
    old = predict_files(client, [data], adapter="pets@1", top_k="6").json()
    assert newest["adapter"] == published.ref and old["adapter"] == "pets@1"  # both versions served
    assert full_distribution(newest["predictions"][0]) != pytest.approx(full_distribution(old["predictions"][0]))


def test_polling_picks_up_a_new_version(
    client: httpx.Client, registry_uri: str, tiny_model: Path, tmp_path: Path
) -> None:
    registry = Registry(registry_uri)
    published = publish_like(
        registry, registry.manifest("pets", 1), random_adapter(tiny_model, tmp_path / "v", seed=4), metrics={}
    )
    def loaded() -> bool:
        return bool({a["ref"]: a["loaded"] for a in client.get("/v1/models").json()["adapters"]}.get(published.ref))

    assert _wait_until(loaded, timeout=60, interval=0.5), f"{published.ref} not picked up by polling"


def test_in_flight_requests_finish_on_their_version(
    client: httpx.Client, registry_uri: str, tiny_model: Path, test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """A request racing a new version's arrival answers wholly from one version: the one it started on.
    The new version has a different label set, so any mixing would show."""
    registry = Registry(registry_uri)
    adapter = random_adapter(tiny_model, tmp_path / "v", seed=5)
    images = [jpeg(path) for _, path in test_images[:MAX_IMAGES]]
    before = registry.resolve("pets")
    with ThreadPoolExecutor(2) as pool:
        racing = pool.submit(predict_files, client, images, top_k="10")
        published = publish_like(registry, registry.manifest("pets", 1), adapter,
                                 labels=LabelSet(labels=BREEDS[:7]), metrics={})
        client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {TOKEN}"})
        answer = racing.result().json()
    assert answer["adapter"] in {f"pets@{before[1]}", published.ref}
    again = predict_files(client, images, adapter=answer["adapter"], top_k="10").json()
    assert_same_answers(again["predictions"], answer["predictions"])
    assert predict_files(client, images[:1]).json()["adapter"] == published.ref


# --- every bad input answered with the right status ----------------------------------------------


def _noise_jpeg(size: int = 200) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (size, size), random.Random(0).randbytes(size * size * 3)).save(buf, format="JPEG")
    return buf.getvalue()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("make", "status", "code"),
    [
        (lambda: b"this is a text file, not a photo", 400, "invalid_image"),
        (lambda: _noise_jpeg()[:3000], 400, "invalid_image"),
        (lambda: _encoded(Image.new("L", (2000, 2000)), "PNG"), 413, "image_too_large"),
        (lambda: _encoded(Image.new("RGB", (32, 32)), "TIFF"), 415, "unsupported_format"),
    ],
    ids=["non-image", "truncated", "decompression-bomb", "tiff"],
)
def test_bad_images(client: httpx.Client, make: object, status: int, code: str) -> None:
    data = make()  # type: ignore[operator]
    assert_error(predict_files(client, [data], adapter="pets@1"), status, code)
    body = {"instances": [{"image": {"bytesBase64Encoded": b64(data)}}]}
    assert_error(client.post("/predict", json=body), status, code)


def test_body_over_the_limit(client: httpx.Client) -> None:
    big = random.Random(1).randbytes(2_500_000)
    assert_error(predict_files(client, [big]), 413, "body_too_large")

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit applies while streaming
        for _ in range(30):
            yield b"x" * 100_000

    streamed = client.post("/v1/predict", content=chunks(), headers={"content-type": "application/json"})
    assert_error(streamed, 413, "body_too_large")


def test_request_errors(client: httpx.Client) -> None:
    png = _encoded(Image.new("RGB", (32, 32), "blue"), "PNG")
    assert_error(predict_files(client, [png] * (MAX_IMAGES + 1)), 422, "too_many_images")
    assert_error(predict_files(client, [png], adapter="no-such-adapter"), 404, "unknown_adapter")
    assert_error(predict_files(client, [png], adapter="pets@99"), 404, "unknown_adapter")
    assert_error(predict_files(client, [png], adapter="pets@x"), 404, "unknown_adapter")
    assert_error(predict_files(client, [png], top_k="0"), 422, "invalid_request")
    no_file = client.post("/v1/predict", files=[("adapter", (None, "pets"))])
    assert_error(no_file, 422, "invalid_request")
    assert_error(client.post("/v1/predict", json={"images": [{"b64": "%%%not-base64"}]}), 400, "invalid_base64")
    assert_error(client.post("/v1/predict", json={"images": [{"b64": b64(png)}], "top_k": 0}), 422, "invalid_request")
    assert_error(client.post("/v1/predict", content=b"{not json", headers={"content-type": "application/json"}),
                 422, "invalid_request")
    assert_error(client.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}),
                 415, "unsupported_media_type")
    assert_error(client.post("/predict", json={"instances": [{"image": {"bytesBase64Encoded": "@@"}}]}),
                 400, "invalid_base64")
    assert_error(client.post("/predict", json={"instances": []}), 422, "invalid_request")
    assert_error(client.post("/predict", json={"wrong": 1}), 422, "invalid_request")
    assert_error(client.get("/no/such/route"), 404, "not_found")
    assert_error(client.get("/v1/predict"), 405, "method_not_allowed")
    assert client.get("/readyz").status_code == 200  # nothing above hurt the server


def test_queue_full_answers_429_with_retry_after(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    images = [jpeg(path) for _, path in test_images[:MAX_IMAGES]]  # one request fills the queue (4)
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: predict_files(client, images, adapter="pets@1"), range(12)))
    statuses = [a.status_code for a in answers]
    assert 200 in statuses and 429 in statuses, statuses
    assert set(statuses) <= {200, 429}
    for answer in answers:
        if answer.status_code == 429:
            assert_error(answer, 429, "queue_full")
            assert int(answer.headers["retry-after"]) >= 1


# --- observability -------------------------------------------------------------------------------


def test_metrics(client: httpx.Client) -> None:
    text = client.get("/metrics").text
    assert 'petbreed_http_requests_total{method="POST",route="/v1/predict",status="200"}' in text
    assert 'petbreed_http_requests_total{method="POST",route="/v1/predict",status="429"}' in text
    assert 'petbreed_http_request_duration_seconds_bucket{le="0.1",route="/v1/predict"}' in text
    assert 'petbreed_predictions_total{adapter="pets@1"}' in text
    assert 'petbreed_predictions_total{adapter="cats@1"}' in text
    assert "petbreed_queue_depth 0.0" in text
    refused = sum(not a["loaded"] for a in client.get("/v1/models").json()["adapters"])
    assert refused >= 1 and f'petbreed_adapters{{state="refused"}} {float(refused)}' in text


def test_stage_metrics_time_every_image(client: httpx.Client, test_images: list[tuple[str, Path]]) -> None:
    """Where a prediction's time goes, per stage: each image is rendered once and asked its root
    once; the full distribution of 6 breeds needs the deeper "American ..." node too."""
    added = _stages_of_one_request(client, [path for _, path in test_images[:3]])
    assert added == {"decode": 1, "render": 3, "round1": 3, "round2": 3}


def _stages_of_one_request(client: httpx.Client, paths: list[Path]) -> dict[str, float]:
    """How many times each stage ran for one request of these images (stages that ran at all)."""
    before = _stage_counts(client)
    assert predict_files(client, [jpeg(p) for p in paths], adapter="pets@1", top_k="6").status_code == 200
    after = _stage_counts(client)
    return {stage: after[stage] - before.get(stage, 0) for stage in after if after[stage] > before.get(stage, 0)}


def _wait_until(condition: Callable[[], bool], timeout: float = 30, interval: float = 0.01) -> bool:
    """Whether `condition` came true within `timeout` seconds, asked every `interval`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
    return True


def _stage_counts(client: httpx.Client) -> dict[str, float]:
    families = {family.name: family for family in text_string_to_metric_families(client.get("/metrics").text)}
    samples = families["petbreed_stage_duration_seconds"].samples
    return {s.labels["stage"]: s.value for s in samples if s.name.endswith("_count")}


def test_logs_are_json_lines(server: dict) -> None:
    ours = [line for line in server["log"].read_text().splitlines() if '"petbreed.serve' in line]
    records = [json.loads(line) for line in ours]
    access = [r for r in records if r["logger"] == "petbreed.serve.access" and r["route"] == "/v1/predict"]
    assert access and {"request_id", "status", "latency_ms", "severity", "time"} <= set(access[-1])
    assert any(r.get("adapter") == "pets@1" and r.get("images") for r in access)


def test_vllms_own_processes_log_json_lines_too(server: dict) -> None:
    """The engine core is a process of its own, where the server's logging set-up never runs."""
    records = server_logs(server)
    engine = [r for r in records if r["logger"].startswith("vllm") and r["process"] != "MainProcess"]
    assert any(r["severity"] == "INFO" and "init engine" in r["message"] for r in engine)


def test_evaluation_report_and_confusion_matrix_of_a_version(client: httpx.Client) -> None:
    report = client.get("/v1/models/pets/1/report")
    assert report.status_code == 200
    models = {a["ref"]: a for a in client.get("/v1/models").json()["adapters"]}
    assert report.json()["accuracy"] == models["pets@1"]["metrics"]["accuracy"]
    assert len(report.json()["confusion"]) == len(models["pets@1"]["labels"])
    png = client.get("/v1/models/pets/1/confusion.png")
    assert png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    missing = client.get("/v1/models/pets/99/report")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "unknown_adapter"
    without = client.get("/v1/models/cats/1/report")
    assert without.status_code == 404 and without.json()["error"]["code"] == "no_report"


def test_with_quantize_vision_tower_vllm_rounds_the_towers_encoder_layers_too(
    test_images: list[tuple[str, Path]], tmp_path: Path
) -> None:
    """vLLM's CPU build runs its online fp8 too. On a tiny model whose tower it can quantize (64 wide,
    a multiple of 64 as E2B/E4B's 768), the server answers with the language model in fp8, then
    again with `quantize_vision_tower`: each answers every image twice to the bit, and the tower's
    rounding moves the answers. How far it may move them is bench/bench_fp8_accuracy.py's question."""
    from finetune.tiny_model import TinyModelConfig, make_tiny_model

    model = make_tiny_model(tmp_path / "tiny64", TinyModelConfig(vision_hidden=64))
    registry = str(tmp_path / "registry")
    publish_random_adapter(model, registry, LabelSet(labels=BREEDS[:6]), LM_ONLY, std=0.3)
    data = [jpeg(path) for _, path in test_images[:4]]
    answers = {}
    for tower in ("false", "true"):
        port, workdir = free_port(), tmp_path / f"tower_{tower}"
        workdir.mkdir()
        env = {"PETBREED_REGISTRY": registry, "PETBREED_PORT": str(port), "PETBREED_POLL_INTERVAL_S": "0",
               "PETBREED_VLLM__TOWER_LORA": "false", "PETBREED_VLLM__DTYPE": "bfloat16",
               "PETBREED_VLLM__QUANTIZATION": "fp8_per_channel", "PETBREED_VLLM__QUANTIZE_VISION_TOWER": tower}
        with running_server(model, env, port, workdir) as server, \
                httpx.Client(base_url=str(server["url"]), timeout=120) as client:
            first, again = (predict_files(client, data, top_k="6").json()["predictions"] for _ in range(2))
        answers[tower] = [full_distribution(p) for p in first]
        assert answers[tower] == [full_distribution(p) for p in again]
        assert all(sum(a.values()) == pytest.approx(1, abs=1e-3) for a in answers[tower])
    pairs = zip(answers["false"], answers["true"], strict=True)
    moved = [max(abs(q[label] - p[label]) for label in p) for p, q in pairs]
    assert max(moved) > 1e-3, moved
