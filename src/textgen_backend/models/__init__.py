"""Model families, keyed by the `architectures` entry of a Hugging Face config.json."""
from torch import nn

from textgen_backend.layers.ops import Ops
from textgen_backend.models.config import ModelConfig
from textgen_backend.models.llama import LlamaForCausalLM
from textgen_backend.models.mistral import MistralForCausalLM
from textgen_backend.models.qwen2 import Qwen2ForCausalLM
from textgen_backend.weights.quantization import QuantConfig

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ValueError(f"architecture {config.architecture!r} is not supported "
                         f"(supported: {', '.join(MODEL_REGISTRY)})") from None


def build_model(config: ModelConfig, ops: Ops, quant: QuantConfig | None = None,
                tp=None) -> nn.Module:
    """tp: a tensor-parallel rank's collectives (parallel/group.py), config then its share."""
    return model_class(config)(config, ops, quant, tp)
