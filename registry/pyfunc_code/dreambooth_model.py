"""MLflow models-from-code entry of a DreamBooth subject model: MLflow runs this file when it loads the
model (nothing is unpickled); the settings come from the MLmodel's model_config. Not imported by Atelier."""

from mlflow.models import set_model

from atelier.registry.pyfunc import DreamBoothModel

set_model(DreamBoothModel())
