"""Error types of lqx's readers. Each message names the file and the field or tensor."""


class ModelFileError(ValueError):
  """A model file or folder (GGUF, Hugging Face safetensors) that lqx will not load, and why."""
