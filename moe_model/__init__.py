"""MoE training recipes on DeepSpeed: a Hugging Face-compatible MoE model and the tools around it."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .balance_callback import ScoreBiasCallback
from .configuration import MoEConfig
from .modeling import MoEForCausalLM, MoEModel

__version__ = "0.1.0"

AutoConfig.register(MoEConfig.model_type, MoEConfig)
AutoModel.register(MoEConfig, MoEModel)
AutoModelForCausalLM.register(MoEConfig, MoEForCausalLM)
# a saved directory carries configuration.py, modeling.py and the model-level files it imports (routing.py,
# grouped_ffn.py, losses.py), so it loads with trust_remote_code=True on a machine without this package
MoEConfig.register_for_auto_class()
MoEModel.register_for_auto_class("AutoModel")
MoEForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["MoEConfig", "MoEForCausalLM", "MoEModel", "ScoreBiasCallback", "__version__"]
