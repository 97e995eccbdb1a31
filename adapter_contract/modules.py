"""Gemma 4's modules outside the language model, as checkpoints and adapters name them.

The released E2B and E4B checkpoints carry an audio tower. A breed classifier never runs it: training
leaves it out of LoRA, and the server tells vLLM to skip it (it is then neither loaded nor used to size
the encoder's memory), so an adapter with LoRA weights on it cannot be served.
"""

AUDIO_MODULES = r"(audio_tower|embed_audio)"
VISION_MODULES = r"(vision_tower|embed_vision)"
TOWER_MODULES = rf"({VISION_MODULES}|{AUDIO_MODULES})\."
