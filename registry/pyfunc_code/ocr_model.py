"""MLflow models-from-code entry of the OCR engine: MLflow runs this file when it loads the model (nothing
is unpickled); the settings come from the MLmodel's model_config. Not imported by Atelier."""

from mlflow.models import set_model

from atelier.registry.ocr import OCRModel

set_model(OCRModel())
