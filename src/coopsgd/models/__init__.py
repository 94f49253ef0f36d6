"""Models ([SPEC] §6): MLP, LeNet-style CNN, CNN-7, ResNet-20, VGG-16 (BN), LSTM and GPT language models.

>>> from coopsgd.models import make_model, count_parameters
>>> count_parameters(make_model("resnet20", num_classes=10, input_shape=(3, 32, 32)))
269722

Every model is a plain ``nn.Module`` whose forward is a pure function of parameters, buffers and
input, so it runs under ``torch.func.functional_call`` + ``vmap(grad)`` (see :mod:`coopsgd.models.functional`).
"""

from coopsgd.models.cnn7 import CNN7
from coopsgd.models.functional import classification_loss, grad_fn, stack_replicas, vmap_grad
from coopsgd.models.gpt import GPT, GPT_DEFAULTS, gpt_parameter_count
from coopsgd.models.lenet import LeNet
from coopsgd.models.lstm import LSTMLanguageModel, LSTMLayer
from coopsgd.models.mlp import MLP
from coopsgd.models.registry import MODELS, count_parameters, make_model
from coopsgd.models.resnet import BasicBlock, ResNet, resnet20
from coopsgd.models.vgg import VGG, VGG16_CONFIG

__all__ = [
    "CNN7",
    "GPT",
    "GPT_DEFAULTS",
    "MLP",
    "MODELS",
    "VGG",
    "VGG16_CONFIG",
    "BasicBlock",
    "LSTMLanguageModel",
    "LSTMLayer",
    "LeNet",
    "ResNet",
    "classification_loss",
    "count_parameters",
    "gpt_parameter_count",
    "grad_fn",
    "make_model",
    "resnet20",
    "stack_replicas",
    "vmap_grad",
]
