"""The public names each package declares resolve, on first use, to what their modules define."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PACKAGES = (
    "polypseg",
    "polypseg.metrics",
    "polypseg.data",
    "polypseg.models",
    "polypseg.inference",
    "polypseg.explain",
    "polypseg.reporting",
)


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_resolves_to_its_module(package: str) -> None:
    module = importlib.import_module(package)
    assert module.__all__, package
    for name in module.__all__:
        value = getattr(module, name)
        if name != "__version__":
            defining = importlib.import_module(module._LAZY[name])
            assert value is getattr(defining, name), f"{package}.{name}"
        assert name in dir(module)


@pytest.mark.parametrize("package", PACKAGES)
def test_an_unknown_name_is_an_attribute_error(package: str) -> None:
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = importlib.import_module(package).no_such_name


def test_submodules_still_import_by_name_through_a_lazy_package() -> None:
    from polypseg.explain import gradcam
    from polypseg.inference import predictor

    assert predictor.Predictor is importlib.import_module("polypseg.inference").Predictor
    assert gradcam.SegmentationGradCAM.__module__ == "polypseg.explain.gradcam"


def test_a_light_module_of_a_stage_package_loads_no_torch() -> None:
    """Importing ``polypseg.data.inputs`` (what the CLI's input handling needs) runs the ``data``
    package's ``__init__`` but loads none of its torch-using siblings."""
    code = "import sys, polypseg.data.inputs, polypseg.reporting, polypseg.explain; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
