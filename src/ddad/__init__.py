"""ddad: diffusion-based visual anomaly detection.

Pipeline: data -> backbones / diffusion -> methods (ddad) -> scoring -> metrics -> report, with one engine
(``ddad.engine``) that trains, tests and predicts for any method, and one typed result
(:class:`ddad.results.AnomalyResult`).
"""

from .api import (adapt_run, demo, export, load_config, load_detector, load_model, predict, test_run, train_run,
                  tune_run, with_detection)
from .data.formats import DataConfig, build_index
from .diffusion.sampler import SamplerConfig, conditioned_denoise
from .diffusion.schedule import ScheduleConfig
from .diffusion.unet import UNet, UNetConfig
from .engine.inference import Inferencer
from .engine.recipe import TrainConfig
from .methods.ddad.detector import Detector
from .methods.ddad.settings import AdaptConfig, DDADConfig, DDADWeights, DetectConfig
from .results import AnomalyResult, SplitMetrics, TestMetrics
from .runs import RunDir, WeightsConfig
from .runtime import RuntimeConfig
from .scoring import ScoringConfig

RunConfig = DDADConfig  # the name of DDAD's run settings before ddad had several methods

__version__ = "0.2.0"

__all__ = [
    "AdaptConfig", "AnomalyResult", "DDADConfig", "DDADWeights", "DataConfig", "DetectConfig", "Detector",
    "Inferencer", "RunConfig", "RunDir", "RuntimeConfig", "SamplerConfig", "ScheduleConfig", "ScoringConfig",
    "SplitMetrics", "TestMetrics", "TrainConfig", "UNet", "UNetConfig", "WeightsConfig", "adapt_run", "build_index",
    "conditioned_denoise", "demo", "export", "load_config", "load_detector", "load_model", "predict", "test_run",
    "train_run", "tune_run", "with_detection",
]
