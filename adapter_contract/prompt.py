"""The classification prompt. Training, evaluation and serving all render it through here, with
the chat template that ships with the base model, so an adapter meets at serving time exactly
the text it was trained on. Bump PROMPT_VERSION whenever the rendered text would change."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from adapter_contract.labels import LabelSet, LabelTrie

PROMPT_VERSION = "breed-v1"
INSTRUCTION = "What breed is the pet in this photo? Answer with the breed name only."
_PROBE = "\x00answer\x00"


class ChatTemplater(Protocol):
    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any: ...


def _messages(answer: str | None) -> list[dict[str, Any]]:
    messages: list[dict[str, Any]] = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": INSTRUCTION}]}
    ]
    if answer is not None:
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
    return messages


def render_prompt(templater: ChatTemplater, bos_token: str | None) -> str:
    """The prompt text up to where the answer starts, with one image placeholder.

    The BOS token is left out: every tokeniser call (the processor's, vLLM's) adds it itself.
    """
    text = str(
        templater.apply_chat_template(
            _messages(None), add_generation_prompt=True, tokenize=False, enable_thinking=False
        )
    )
    return text.removeprefix(bos_token) if bos_token else text


def answer_terminator(templater: ChatTemplater) -> str:
    """The text the chat template puts right after an assistant answer (its end-of-turn marker)."""
    full = str(templater.apply_chat_template(_messages(_PROBE), tokenize=False, enable_thinking=False))
    after = full.split(_PROBE, 1)[1]
    return after.rstrip("\n") or after


class Tokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


def answer_token_ids(tokenizer: Tokenizer, prompt: str, answer: str, terminator: str) -> tuple[int, ...]:
    """The tokens the model emits for `answer`, tokenised in place after the prompt.

    Tokenising the answer alone can differ from tokenising it in context, so this takes the
    difference and insists the prompt's tokens are untouched by the answer.
    """
    head = tokenizer.encode(prompt, add_special_tokens=False)
    full = tokenizer.encode(prompt + answer + terminator, add_special_tokens=False)
    if full[: len(head)] != head:
        raise ValueError(f"answer {answer!r} merges with the end of the prompt when tokenised")
    return tuple(full[len(head) :])


class Processor(ChatTemplater, Protocol):
    tokenizer: Any


@dataclass(frozen=True)
class ClassificationPrompt:
    """The rendered prompt plus each label's answer tokens and their trie."""

    text: str
    terminator: str
    label_ids: list[str]
    answers: dict[str, tuple[int, ...]]
    trie: LabelTrie

    @classmethod
    def build(cls, processor: Processor, labels: LabelSet) -> ClassificationPrompt:
        text = render_prompt(processor, processor.tokenizer.bos_token)
        terminator = answer_terminator(processor)
        answers = {
            label.id: answer_token_ids(processor.tokenizer, text, label.text, terminator) for label in labels.labels
        }
        return cls(text, terminator, labels.ids, answers, LabelTrie([answers[i] for i in labels.ids]))
