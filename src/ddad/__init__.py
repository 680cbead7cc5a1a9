"""ddad: diffusion-based visual anomaly detection (DDAD, Mousakhan et al.).

Pipeline: data -> diffusion (UNet, schedule, conditioned sampler) -> scoring -> metrics -> report.
"""

from .api import demo, train_run
from .config import RunConfig
from .data.formats import DataConfig, build_index
from .detection import DetectConfig, DetectionResult, Detector
from .diffusion.sampler import SamplerConfig, conditioned_denoise
from .diffusion.schedule import ScheduleConfig
from .diffusion.unet import UNet, UNetConfig
from .evaluation import load_detector, predict, test_run
from .runs import RunDir
from .scoring import ScoringConfig
from .training import TrainConfig

__version__ = "0.1.0"

__all__ = [
    "DataConfig", "DetectConfig", "DetectionResult", "Detector", "RunConfig", "RunDir", "SamplerConfig",
    "ScheduleConfig", "ScoringConfig", "TrainConfig", "UNet", "UNetConfig", "build_index", "conditioned_denoise",
    "demo", "load_detector", "predict", "test_run", "train_run",
]
