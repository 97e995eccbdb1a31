"""`compile: true` (the GPU default) compiles the decoder and vision-encoder layers; the loss and
the LoRA gradients must be those of the eager model."""

from __future__ import annotations

from pathlib import Path

import torch

from adapter_contract.prompt import ClassificationPrompt
from finetune.data import load_dataset, load_image
from finetune.model import LoraSettings, add_lora, compile_blocks, load_base, load_processor
from finetune.scoring import answer_loss, training_batch


def test_compiled_blocks_give_the_eager_loss_and_gradients(tiny_model: Path, synthetic_data: Path,
                                                           tmp_path: Path) -> None:
    data = load_dataset(str(synthetic_data), tmp_path / "cache")
    processor = load_processor(str(tiny_model))
    prompt = ClassificationPrompt.build(processor, data.labels)
    examples = data.train[:4]
    batch = training_batch(processor, prompt, [load_image(e.path) for e in examples], [e.label for e in examples],
                           {label.id: label.text for label in data.labels.labels}, torch.device("cpu"))
    torch.manual_seed(0)
    model = add_lora(load_base(str(tiny_model), torch.device("cpu")), LoraSettings())

    def loss_and_grads() -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        loss = answer_loss(model, batch)
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    eager_loss, eager_grads = loss_and_grads()
    config = model.get_base_model().config
    # Fewer graphs allowed than the tiny model has layer variants (sliding and global attention,
    # a first layer whose input needs no gradient), as E4B has more than dynamo's default 8:
    # compile_blocks must make room for all of them, and none may silently run eagerly.
    with torch._dynamo.config.patch(recompile_limit=1, fail_on_recompile_limit_hit=True):
        assert compile_blocks(model) == config.text_config.num_hidden_layers + config.vision_config.num_hidden_layers
        compiled_loss, compiled_grads = loss_and_grads()

    assert abs(compiled_loss - eager_loss) < 1e-5
    assert len(compiled_grads) == len(eager_grads) > 0
    assert max((a - b).abs().max().item() for a, b in zip(compiled_grads, eager_grads, strict=True)) < 1e-5
