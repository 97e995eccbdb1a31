"""VllmClassifier's request plan, against a recording stand-in for the engine. The real engine
answers the same plan in test_serve_api.py (vLLM against transformers + PEFT); a trie node with
more children than vLLM returns log-probabilities for in one request only fits in this test."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from PIL import Image

from adapter_contract.labels import LabelTrie
from serve.engine import MAX_IDS_PER_REQUEST, RequestAborted, VllmClassifier


class RecordingRenderer:
    """vLLM's renderer: marks each prompt processed, as vLLM's does, and records it."""

    def __init__(self) -> None:
        self.rendered: list[dict[str, Any]] = []

    async def render_cmpl_async(self, prompts: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.rendered += prompts
        await asyncio.sleep(0)  # vLLM's renders in a thread: other images go on meanwhile
        return [{"type": "multimodal", **prompt} for prompt in prompts]


class RecordingPool:
    """The render processes (serve/render_pool.py): records each prompt, renders as vLLM's renderer."""

    def __init__(self) -> None:
        self.rendered: list[dict[str, Any]] = []

    async def render(self, prompt: dict[str, Any]) -> dict[str, Any]:
        self.rendered.append(prompt)
        await asyncio.sleep(0)
        return {"type": "multimodal", **prompt}


class RecordingEngine:
    """Answers each request with log p(token) for the ids it asked about: from `probs` where given,
    else -token / 100. After `answers` requests it aborts the rest, as a stopping engine core does."""

    def __init__(self, probs: dict[int, float] | None = None, answers: int | None = None) -> None:
        self.requests: list[dict[str, Any]] = []
        self.probs = probs or {}
        self.answers = answers
        self.renderer = RecordingRenderer()

    async def generate(self, prompt: dict[str, Any], params: Any, **_: Any) -> AsyncIterator[Any]:
        self.requests.append({"prompt": prompt, "ids": list(params.logprob_token_ids)})
        if self.answers is not None and len(self.requests) > self.answers:
            yield SimpleNamespace(outputs=[SimpleNamespace(logprobs=None, finish_reason="abort")])
            return
        logprobs = {t: SimpleNamespace(logprob=self._logprob(t)) for t in params.logprob_token_ids}
        yield SimpleNamespace(outputs=[SimpleNamespace(logprobs=[logprobs], finish_reason="length")])

    def _logprob(self, token: int) -> float:
        return math.log(self.probs[token]) if token in self.probs else -token / 100


def entry_for(trie: LabelTrie, soft_tokens: int | None = None) -> Any:
    prompt = SimpleNamespace(trie=trie)
    manifest = SimpleNamespace(image_soft_tokens=soft_tokens)
    return SimpleNamespace(prompt=prompt, prompt_token_ids=(7, 8), ref="pets@1", lora_id=1, path=Path("adapter"),
                           manifest=manifest)


def test_a_node_with_more_children_than_one_request_returns_is_asked_in_chunks() -> None:
    n = 2 * MAX_IDS_PER_REQUEST + 44
    trie = LabelTrie([(1000 + i, 1) for i in range(n)])  # one branch node (the root) with n children
    engine = RecordingEngine()

    [probs] = asyncio.run(VllmClassifier(engine).classify([Image.new("RGB", (8, 8))], entry_for(trie)))

    assert [len(r["ids"]) for r in engine.requests] == [MAX_IDS_PER_REQUEST, MAX_IDS_PER_REQUEST, 44]
    weights = [math.exp(-(1000 + i) / 100) for i in range(n)]
    assert max(abs(p - w / sum(weights)) for p, w in zip(probs, weights, strict=True)) < 1e-12


def test_a_request_the_engine_aborts_is_reported_as_aborted() -> None:
    """A stopping engine core answers the requests it has and refuses the next (an image's second
    trie round): the API answers 503 `request_aborted` (test_serve_api.py, on the real engine)."""
    trie = LabelTrie([(1, 2), (1, 3), (4, 5)])  # branch nodes: the root and (1,)

    with pytest.raises(RequestAborted):
        asyncio.run(VllmClassifier(RecordingEngine(answers=1)).classify([Image.new("RGB", (8, 8))], entry_for(trie)))


def test_each_image_is_processed_once_and_every_request_about_it_extends_that() -> None:
    trie = LabelTrie([(1, 2), (1, 3), (4, 5)])  # branch nodes: the root and (1,)
    engine = RecordingEngine()
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]

    asyncio.run(VllmClassifier(engine).classify(images, entry_for(trie)))

    assert [prompt["prompt_token_ids"] for prompt in engine.renderer.rendered] == [[7, 8], [7, 8]]
    assert len(engine.requests) == 4  # two nodes for each image
    for request in engine.requests:
        prompt = request["prompt"]
        assert prompt["type"] == "multimodal"  # processed: vLLM does not process it again
        assert prompt["prompt_token_ids"] in ([7, 8], [7, 8, 1])  # the root's, then node (1,)'s answer prefix
        assert any(prompt["multi_modal_data"] is r["multi_modal_data"] for r in engine.renderer.rendered)


def test_every_request_about_one_image_names_it_with_the_same_id_and_other_images_differently() -> None:
    trie = LabelTrie([(1, 2), (1, 3), (4, 5)])  # branch nodes: the root and (1,)
    engine = RecordingEngine()
    images = [Image.new("RGB", (8, 8)), Image.new("RGB", (8, 8))]

    asyncio.run(VllmClassifier(engine, soft_tokens=70).classify(images, entry_for(trie)))

    ids: dict[int, set[str]] = {}
    for request in engine.requests:
        prompt = request["prompt"]
        assert prompt["mm_processor_kwargs"] == {"max_soft_tokens": 70}
        [uid] = prompt["multi_modal_uuids"]["image"]
        ids.setdefault(id(prompt["multi_modal_data"]["image"]), set()).add(uid)
    assert len(engine.requests) == 4  # two nodes for each image
    assert [len(uids) for uids in ids.values()] == [1, 1]
    assert len(set.union(*ids.values())) == 2


def test_with_a_pixel_scale_images_are_sent_unscaled() -> None:
    engine = RecordingEngine()

    asyncio.run(VllmClassifier(engine, pixel_scale=1 / 255).classify([Image.new("RGB", (8, 8))],
                                                                       entry_for(LabelTrie([(1,), (4,)]))))

    [request] = engine.requests
    assert request["prompt"]["mm_processor_kwargs"] == {"do_rescale": False}


@pytest.mark.parametrize(("adapters", "override", "sent"), [(None, None, None), (140, None, 140), (140, 70, 70)])
def test_images_are_sent_with_the_adapters_own_budget_unless_the_server_sets_one(
    adapters: int | None, override: int | None, sent: int | None
) -> None:
    engine = RecordingEngine()
    trie = LabelTrie([(1,), (4,)])

    asyncio.run(VllmClassifier(engine, soft_tokens=override).classify([Image.new("RGB", (8, 8))],
                                                                       entry_for(trie, adapters)))

    [request] = engine.requests
    assert request["prompt"].get("mm_processor_kwargs") == (None if sent is None else {"max_soft_tokens": sent})


def test_warm_up_runs_once_per_image_budget_whichever_adapter_asks() -> None:
    """A second adapter with the same budget has nothing to warm; one with a new budget (or the
    model's default) sends its images at that budget."""
    engine = RecordingEngine()
    classifier = VllmClassifier(engine)
    trie = LabelTrie([(1,), (4,)])

    ran = [asyncio.run(classifier.warm_up(entry_for(trie, budget), images=2)) for budget in (70, 70, 140, None)]

    assert ran == [True, False, True, True]
    sent = [prompt.get("mm_processor_kwargs") for prompt in engine.renderer.rendered]
    assert sent == [{"max_soft_tokens": 70}] * 2 + [{"max_soft_tokens": 140}] * 2 + [None] * 2


def test_with_top_k_deeper_nodes_are_asked_only_where_a_top_label_can_hide() -> None:
    # Root children 1, 4, 5; node (1,) decides between labels 1-2 and 1-3.
    trie = LabelTrie([(1, 2), (1, 3), (4,), (5,)])
    probs = {1: 0.05, 4: 0.9, 5: 0.05, 2: 0.5, 3: 0.5}

    def classify(top_k: int | None) -> tuple[list[float], int]:
        engine = RecordingEngine(probs)
        [out] = asyncio.run(VllmClassifier(engine).classify([Image.new("RGB", (8, 8))], entry_for(trie), top_k))
        return out, len(engine.requests)

    full, asked = classify(None)
    assert full == pytest.approx([0.025, 0.025, 0.9, 0.05]) and asked == 2
    top1, asked = classify(1)  # subtree (1,) holds at most 0.05 < 0.9: skipped
    assert top1 == pytest.approx([0.0, 0.0, 0.9, 0.05]) and asked == 1
    top2, asked = classify(2)  # at most 0.05, not above the 2nd label's 0.05: skipped
    assert top2 == top1 and asked == 1
    top3, asked = classify(3)  # the root decides only 2 labels: the subtree is needed
    assert top3 == pytest.approx(full) and asked == 2


def test_an_image_alone_renders_in_this_process_and_images_that_arrive_together_in_the_render_processes() -> None:
    engine, pool = RecordingEngine(), RecordingPool()
    classifier = VllmClassifier(engine, render_pool=cast(Any, pool))
    entry = entry_for(LabelTrie([(1,), (4,)]))

    asyncio.run(classifier.classify([Image.new("RGB", (8, 8))], entry))
    assert (len(engine.renderer.rendered), len(pool.rendered)) == (1, 0)

    asyncio.run(classifier.classify([Image.new("RGB", (8, 8)) for _ in range(3)], entry))
    assert (len(engine.renderer.rendered), len(pool.rendered)) == (2, 2)  # the first of three here, two there
