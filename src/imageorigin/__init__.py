"""imageorigin: tell whether an image was made by a person, by DALL-E, or by another AI.

    import imageorigin
    model = imageorigin.load()                 # the shipped default, or a checkpoint path
    for p in imageorigin.predict(model, ["photo.jpg", pil_image]):
        print(p.path, p.label, p.p_ai, p.error)
"""

from .backbones import BackboneWeightsError
from .data import DataFolderError
from .evaluate import evaluate
from .export import export_onnx, export_seed
from .images import ImageDecodeError, decode_image
from .model import CheckpointError, Classifier, load, save
from .predict import Prediction, predict
from .train import TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "BackboneWeightsError",
    "CheckpointError",
    "Classifier",
    "DataFolderError",
    "ImageDecodeError",
    "Prediction",
    "TrainConfig",
    "decode_image",
    "evaluate",
    "export_onnx",
    "export_seed",
    "load",
    "predict",
    "save",
    "train",
]
