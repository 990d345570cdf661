"""A version registered before the one import root ships code that imports `models.*`, `registry.*`
and `atelier.storage`: it still loads, and runs the platform's installed code under those names."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from atelier.registry.legacy_names import current_name, is_legacy_layout


def test_old_names_map_to_the_modules_under_the_atelier_root(tmp_path):
    assert current_name("models.dreambooth.pipeline") == "atelier.models.dreambooth.pipeline"
    assert current_name("atelier.storage") == "atelier.kernel.storage" and current_name("registry") == "atelier.registry"
    assert current_name("atelier.models") is None and current_name("numpy") is None and current_name("atelier") is None
    (tmp_path / "old" / "models").mkdir(parents=True)
    (tmp_path / "new" / "atelier" / "kernel").mkdir(parents=True)
    assert is_legacy_layout(tmp_path / "old") and not is_legacy_layout(tmp_path / "new")


def test_a_pyfunc_of_the_old_layout_loads_with_the_installed_code(tmp_path):
    """Its stale shipped `models/` (on sys.path through code/) is never imported: the old name is the
    installed module itself."""
    shipped = tmp_path / "shipped" / "models"
    shipped.mkdir(parents=True)
    (shipped / "__init__.py").write_text("raise ImportError('the stale copy shipped with the model was imported')\n")
    wrapper = tmp_path / "dreambooth_model.py"
    wrapper.write_text(
        textwrap.dedent("""
        import mlflow
        from models.dreambooth.config import TrainConfig   # 0.1's names
        from atelier.storage import write_text_atomic

        class Model(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input):
                return [TrainConfig.__module__, write_text_atomic.__module__]

        mlflow.models.set_model(Model())
    """)
    )
    model = tmp_path / "model"
    code = (
        "import mlflow.pyfunc, pathlib; from atelier.registry import legacy_names;"
        "legacy_names.install();"  # as 0.1 saved it (MLflow runs the wrapper once to save it), then as the platform loads it
        f"mlflow.pyfunc.save_model({str(model)!r}, python_model={str(wrapper)!r}, code_paths=[{str(shipped)!r}]);"
        f"assert legacy_names.is_legacy_layout(pathlib.Path({str(model / 'code')!r}));"
        f"print(mlflow.pyfunc.load_model({str(model)!r}).predict(['x']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "['atelier.models.dreambooth.config', 'atelier.kernel.storage']" in done.stdout
