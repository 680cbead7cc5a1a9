"""ddad_infer: run a model exported by ``ddad export`` on a line PC, without torch (numpy, Pillow, and ONNX
Runtime or OpenVINO). ``ddad-infer FOLDER IMAGES`` on the command line, or::

    import ddad_infer
    model = ddad_infer.load("runs/washer/export")
    print([(r.image, r.pred_score, r.pred_label) for r in model.predict(["part.png"])])

``ddad`` itself decodes images, seeds noise and decides through these modules, so both score alike.
"""

from .methods import load
from .model import ExportError, ExportedModel, Prediction

__version__ = "0.2.0"
__all__ = ["ExportError", "ExportedModel", "Prediction", "load"]
