"""ONNX export vs PyTorch, the onnxruntime backend of Predictor, its cache, and int8 quantization."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from polypseg.data.sample_data import sample_dataset_path
from polypseg.errors import PolypsegError
from polypseg.inference.deploy import measure_dice_change
from polypseg.inference.export import (
    ExportError,
    _export_graph,
    _Probability,
    cached_int8_path,
    cached_onnx,
    create_session,
    export_onnx,
    find_validated_int8,
    int8_path_for,
    int8_validated,
    onnx_sidecar,
    quantize_onnx_int8,
    read_onnx_metadata,
    record_dice_change,
    verify_onnx,
    written_opset,
)
from polypseg.inference.predictor import Predictor, _preferred_onnx, openvino_installed
from polypseg.models.checkpoint import save_checkpoint
from polypseg.models.factory import create_model

from helpers import tiny_config, write_synthetic_dataset


def _save_tiny(path: Path, seed: int = 0) -> Path:
    config = tiny_config(image_size=64)
    torch.manual_seed(seed)
    return save_checkpoint(path, create_model(config.model).eval(), config, threshold=0.4, metrics={"dice": 0.5})


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory: pytest.TempPathFactory):
    """The polypseg cache folder of this module's tests (never the user's ~/.cache)."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("POLYPSEG_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, cache: Path) -> tuple[Path, Path]:
    """A tiny checkpoint and its cached ONNX export (one export for the whole module)."""
    checkpoint = _save_tiny(tmp_path_factory.mktemp("export") / "tiny")
    return checkpoint, cached_onnx(checkpoint)


def _torch_cpu_atol() -> float:
    """The torch backend runs bf16 autocast on a CPU with native bf16 (polypseg.core.precision), fp32 elsewhere."""
    try:
        from polypseg.core.precision import resolve_precision
    except ImportError:
        return 1e-4
    return 1e-2 if resolve_precision("auto", "cpu") == "bf16" else 1e-4


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (rng.integers(30, 90), rng.integers(30, 90), 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.slow
def test_export_writes_graph_and_sidecar_and_matches_torch(exported: tuple[Path, Path], cache: Path) -> None:
    checkpoint, onnx_path = exported
    # cached by content in the cache folder, never beside the checkpoint (a user's run folder)
    assert onnx_path.parent == cache / "onnx" and not checkpoint.with_suffix(".onnx").exists()
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["tiny.json", "tiny.safetensors"]
    meta = read_onnx_metadata(onnx_path)
    assert meta["image_size"] == 64 and meta["threshold"] == 0.4 and meta["output"] == "probability"
    assert meta["config"]["model"]["encoder"] == "resnet18" and meta["metrics"] == {"dice": 0.5}
    graph = onnx.load(str(onnx_path)).graph
    assert graph.node[-1].op_type == "Sigmoid"
    real = sorted((sample_dataset_path() / "images").glob("*.jpg"))[:3]
    assert verify_onnx(checkpoint, onnx_path, random_images=3) < 1e-4
    assert verify_onnx(checkpoint, onnx_path, images=real, random_images=0) < 1e-4


def test_dynamic_batch(exported: tuple[Path, Path]) -> None:
    _, onnx_path = exported
    session = create_session(onnx_path)
    x = np.random.default_rng(0).standard_normal((5, 3, 64, 64)).astype(np.float32)
    batched = session.run(None, {"image": x})[0]
    assert batched.shape == (5, 1, 64, 64)
    single = session.run(None, {"image": x[2:3]})[0]
    np.testing.assert_allclose(batched[2:3], single, atol=1e-5)


def test_onnxruntime_backend_matches_torch_predictor(exported: tuple[Path, Path]) -> None:
    checkpoint, onnx_path = exported
    stamp = onnx_path.stat().st_mtime_ns
    ort_predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime", batch_size=3)
    assert onnx_path.stat().st_mtime_ns == stamp  # cache reused, not re-exported
    auto = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto")
    assert ort_predictor.backend == "onnxruntime" and ort_predictor.models == []
    assert auto.backend == ("openvino" if openvino_installed() else "onnxruntime")
    torch_predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch")
    images = _images(4)
    atol = _torch_cpu_atol()
    for a, b in zip(ort_predictor.predict(images), torch_predictor.predict(images), strict=False):
        assert a.probability.shape == b.probability.shape
        np.testing.assert_allclose(a.probability, b.probability, atol=atol)
    assert ort_predictor.threshold == 0.4 and ort_predictor.image_size == 64
    tta = Predictor.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime", tta=True).predict_one(images[0])
    tta_torch = Predictor.from_checkpoint(checkpoint, device="cpu", backend="torch", tta=True).predict_one(images[0])
    np.testing.assert_allclose(tta.probability, tta_torch.probability, atol=atol)


def test_onnx_file_loads_directly_with_its_sidecar(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, onnx_path = exported
    predictor = Predictor.from_checkpoint(onnx_path, device="cpu")  # auto: OpenVINO where installed, as for checkpoints
    assert predictor.backend == ("openvino" if openvino_installed() else "onnxruntime")
    assert predictor.threshold == 0.4 and predictor.image_size == 64
    assert predictor.metadata["config"]["model"]["encoder"] == "resnet18"
    # Without a sidecar the input size comes from the graph and the threshold is 0.5.
    bare = tmp_path / "bare.onnx"
    bare.write_bytes(onnx_path.read_bytes())
    bare_predictor = Predictor.from_checkpoint(bare, device="cpu")
    assert bare_predictor.image_size == 64 and bare_predictor.threshold == 0.5
    image = _images(1)[0]
    np.testing.assert_allclose(bare_predictor.predict_one(image).probability, predictor.predict_one(image).probability)


def test_cache_is_keyed_by_content_not_by_size_or_time(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import functools

    from polypseg.inference import export
    from polypseg.models.checkpoint import CheckpointError

    # The cache logic does not depend on the exporter: use the quicker TorchScript one here.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    source_checkpoint, source_onnx = exported
    checkpoint = tmp_path / "model.safetensors"
    for suffix in (".safetensors", ".json"):
        checkpoint.with_suffix(suffix).write_bytes(source_checkpoint.with_suffix(suffix).read_bytes())
    stamp = source_onnx.stat().st_mtime_ns
    assert cached_onnx(checkpoint) == source_onnx  # same content, other path: the same export
    assert source_onnx.stat().st_mtime_ns == stamp  # reused, not re-exported

    # A content change that size and modification time hide: weights replaced by random bytes, both restored.
    stat = checkpoint.stat()
    checkpoint.write_bytes(os.urandom(stat.st_size))
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    with pytest.raises(CheckpointError, match="cannot load weights .*model.safetensors"):
        cached_onnx(checkpoint)
    with pytest.raises(CheckpointError, match="cannot load weights"):
        Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto")

    image = _images(1)[0]
    before = Predictor.from_checkpoint(source_onnx, device="cpu").predict_one(image).probability
    _save_tiny(tmp_path / "model", seed=1)  # new weights under the same name
    notes: list[str] = []
    renewed = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", notify=notes.append)
    assert len(notes) == 1 and "exporting 1 model to ONNX" in notes[0]
    assert f"for {'OpenVINO' if renewed.backend == 'openvino' else 'onnxruntime'} " in notes[0]  # the engine used
    assert renewed.metadata["onnx"][0] != str(source_onnx)
    after = renewed.predict_one(image).probability
    assert np.abs(after - before).max() > 1e-3
    assert verify_onnx(checkpoint, renewed.metadata["onnx"][0], images=[image], random_images=1) < 1e-4  # fp32 torch
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.json", "model.safetensors"]
    again: list[str] = []
    Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", notify=again.append)
    assert again == []  # exported once


def test_cache_folder_follows_xdg_and_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from polypseg.data.cache import default_cache_dir
    from polypseg.inference.export import onnx_cache_dir

    monkeypatch.delenv("POLYPSEG_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "polypseg"
    assert onnx_cache_dir() == tmp_path / "xdg" / "polypseg" / "onnx"
    assert onnx_cache_dir(tmp_path / "mine") == tmp_path / "mine" / "onnx"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert default_cache_dir() == Path.home() / ".cache" / "polypseg"
    monkeypatch.setenv("POLYPSEG_CACHE", str(tmp_path / "explicit"))
    assert default_cache_dir() == tmp_path / "explicit"


def test_torchscript_exporter_fallback_agrees(exported: tuple[Path, Path], tmp_path: Path) -> None:
    from polypseg.models.checkpoint import load_checkpoint

    checkpoint, onnx_path = exported
    wrapped = _Probability(load_checkpoint(checkpoint).model).eval()
    legacy = tmp_path / "legacy.onnx"
    _export_graph(wrapped, 64, legacy, opset=17, dynamic_batch=True, dynamo=False)
    assert not wrapped.training  # the exporter must not leave BatchNorm in training mode
    x = np.random.default_rng(1).standard_normal((2, 3, 64, 64)).astype(np.float32)
    a = create_session(legacy).run(None, {"image": x})[0]
    b = create_session(onnx_path).run(None, {"image": x})[0]
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_calibration_names_each_unreadable_image_once_and_uses_the_rest(tmp_path: Path) -> None:
    from PIL import Image

    from polypseg.inference.export import _CalibrationReader

    good, broken = tmp_path / "good.png", tmp_path / "broken.jpg"
    Image.fromarray(_images(1)[0]).save(good)
    broken.write_bytes(b"not a jpeg")
    said: list[str] = []
    reader = _CalibrationReader([good, broken, _images(1, seed=1)[0]], 32, "image", warn=said.append)
    for _ in range(2):  # read again after a rewind: still named once
        batch = reader.get_next()
        assert batch is not None and batch["image"].shape == (2, 3, 32, 32)
        assert reader.get_next() is None
        reader.rewind()
    assert reader.unreadable == ["broken.jpg"] and reader.files == ["good.png", "good.png"]
    assert len(said) == 1 and "broken.jpg" in said[0] and said[0].startswith("calibration: ")


def test_int8_quantization_validation_and_auto_choice(exported: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, onnx_path = exported
    int8 = quantize_onnx_int8(onnx_path, int8_path_for(checkpoint), sample_dataset_path(), max_images=8)
    assert int8 == checkpoint.with_suffix(".int8.onnx")
    ops = {node.op_type for node in onnx.load(str(int8)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    meta = read_onnx_metadata(int8)
    assert meta["quantization"]["calibration_images"] == 8 and meta["quantization"]["dice_change"] is None
    assert meta["quantization"]["calibration_unreadable"] == []
    predictor = Predictor.from_checkpoint(int8, device="cpu")
    fp32 = Predictor.from_checkpoint(onnx_path, device="cpu")
    image = _images(1)[0]
    difference = np.abs(predictor.predict_one(image).probability - fp32.predict_one(image).probability)
    assert 0 < difference.mean() < 0.05  # quantized, and still close

    # Not validated: the CPU default stays fp32.
    assert not int8_validated(int8, checkpoint)
    assert _preferred_onnx(checkpoint) == onnx_path
    data = write_synthetic_dataset(tmp_path / "data", n=3)
    change = measure_dice_change(onnx_path, int8, data, progress=False)
    assert change["n"] == 3 and 0 <= change["dice_reference"] <= 1
    assert change["dice_change"] == pytest.approx(change["dice_candidate"] - change["dice_reference"])
    record_dice_change(int8, {**change, "dice_change": 0.001})
    assert int8_validated(int8, checkpoint) and _preferred_onnx(checkpoint) == int8
    # Validated int8 is what backend="auto" picks when the precision is left to it, never for fp32 or bf16.
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "int8"
    for asked in ("fp32", "bf16"):
        assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", precision=asked).precision != "int8"
    record_dice_change(int8, {**change, "dice_change": -0.02})
    assert not int8_validated(int8, checkpoint) and _preferred_onnx(checkpoint) == onnx_path
    int8.unlink()
    onnx_sidecar(int8).unlink()


def test_a_validated_int8_exported_elsewhere_is_kept_in_the_cache_for_auto(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shipped model's export must go elsewhere (--out); once validated, backend="auto" still finds it."""
    import functools

    from polypseg.inference import deploy, export

    # Where the int8 copy is kept does not depend on the exporter: use the quicker TorchScript one here.
    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    checkpoint = _save_tiny(tmp_path / "ckpt" / "tiny", seed=3)
    monkeypatch.setenv("POLYPSEG_CACHE", str(tmp_path / "cache"))
    change = {"n": 3, "data": "d", "dice_reference": 0.8, "dice_candidate": 0.799, "dice_change": -0.001}
    monkeypatch.setattr(deploy, "measure_dice_change", lambda *args, **kwargs: change)
    said: list[str] = []
    out = tmp_path / "deploy" / "model.onnx"
    [result] = deploy.export_checkpoints(
        checkpoint, out=out, int8=True, calibration_count=4, validate=tmp_path, say=said.append
    )
    kept = Path(result["int8_cached"])
    assert kept == cached_int8_path(checkpoint) and onnx_sidecar(kept).is_file()
    assert kept.read_bytes() == out.with_suffix(".int8.onnx").read_bytes()
    assert not int8_path_for(checkpoint).exists()  # nothing written beside the checkpoint
    assert find_validated_int8(checkpoint) == kept
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").precision == "int8"
    assert any("int8 becomes the CPU default" in line and "a copy kept in" in line for line in said)
    # the copy answers only for the content it was made from
    other = _save_tiny(tmp_path / "ckpt2" / "tiny", seed=4)
    assert find_validated_int8(other) is None

    # beyond the bound: nothing kept, fp32 stays the default
    kept.unlink()
    monkeypatch.setitem(change, "dice_change", -0.02)
    [result] = deploy.export_checkpoints(
        checkpoint, out=out, int8=True, calibration_count=4, validate=tmp_path, say=said.append
    )
    assert "int8_cached" not in result and find_validated_int8(checkpoint) is None


def test_same_model_has_zero_dice_change(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, onnx_path = exported
    data = write_synthetic_dataset(tmp_path / "data", n=2)
    assert measure_dice_change(onnx_path, onnx_path, data, progress=False)["dice_change"] == 0


def test_export_errors_name_the_file(exported: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, _ = exported
    with pytest.raises(ExportError, match="must end in .onnx"):
        export_onnx(checkpoint, tmp_path / "model.bin")
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(b"not a model")
    with pytest.raises(ExportError, match=r"^onnxruntime cannot load .*broken.onnx: .*Protobuf parsing failed"):
        Predictor.from_checkpoint(broken, device="cpu", backend="onnxruntime")
    if _openvino_importable():
        with pytest.raises(
            PolypsegError, match=r"^OpenVINO cannot read .*broken.onnx: Unable to read the model"
        ) as raised:
            Predictor.from_checkpoint(broken, device="cpu", backend="openvino")
        assert "\n" not in str(raised.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match="no images in .*empty"):
        quantize_onnx_int8(exported[1], tmp_path / "q.onnx", tmp_path / "empty")


def test_auto_on_cpu_prefers_openvino_and_falls_back_to_onnxruntime(
    exported: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """backend="auto" on CPU: OpenVINO where installed (the fastest within 0.005 Dice), else onnxruntime."""
    import polypseg.inference.predictor as inference

    checkpoint, _ = exported
    monkeypatch.setattr(inference, "openvino_installed", lambda: False)
    assert Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto").backend == "onnxruntime"
    if _openvino_importable():
        monkeypatch.setattr(inference, "openvino_installed", lambda: True)
        chosen = Predictor.from_checkpoint(checkpoint, device="cpu", backend="auto", precision="fp32")
        assert chosen.backend == "openvino" and chosen.precision == "fp32"


def _openvino_importable() -> bool:
    from importlib.util import find_spec

    return find_spec("openvino") is not None


def test_a_static_batch_export_verifies_and_is_never_taken_for_prediction(
    exported: tuple[Path, Path], tmp_path: Path
) -> None:
    """--static-batch fixes the batch at 1: verification runs image by image, prediction keeps its own export."""
    from polypseg.inference.deploy import export_checkpoints
    from polypseg.inference.export import find_cached_onnx

    # The module's checkpoint under another name: prediction below finds its dynamic export by content.
    source_checkpoint, source_onnx = exported
    checkpoint = tmp_path / "static.safetensors"
    for suffix in (".safetensors", ".json"):
        checkpoint.with_suffix(suffix).write_bytes(source_checkpoint.with_suffix(suffix).read_bytes())
    results = export_checkpoints(checkpoint, dynamic_batch=False, say=lambda message: None)
    static = Path(results[0]["onnx"])
    assert static == checkpoint.with_suffix(".onnx") and read_onnx_metadata(static)["input"]["shape"][0] == 1
    assert results[0]["max_abs_diff_random"] < 1e-3
    assert find_cached_onnx(checkpoint, tmp_path / "empty-cache") is None  # batches of any size would fail on it
    predictor = Predictor.from_checkpoint(checkpoint, device="cpu", backend="onnxruntime", batch_size=4)
    assert predictor.metadata["onnx"] == [str(source_onnx)]  # the dynamic export, not the static file beside it
    assert len(predictor.predict(_images(3))) == 3
    with pytest.raises(ExportError, match="--int8 needs the batch axis"):
        export_checkpoints(checkpoint, dynamic_batch=False, int8=True, say=lambda message: None)


def test_an_onnx_file_honours_the_backend_and_refuses_what_it_cannot_do(exported: tuple[Path, Path]) -> None:
    from polypseg.inference.predictor import PredictorError

    _, onnx_path = exported
    with pytest.raises(PredictorError, match="fold and compile apply to checkpoints"):
        Predictor.from_checkpoint(onnx_path, device="cpu", fold=0)
    with pytest.raises(PredictorError, match="fold and compile apply to checkpoints"):
        Predictor.from_checkpoint(onnx_path, device="cpu", backend="onnxruntime", compile=True)
    if _openvino_importable():
        assert Predictor.from_checkpoint(onnx_path, device="cpu", backend="openvino").backend == "openvino"


def test_export_writes_the_opset_asked_for_or_says_it_cannot(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    import polypseg.inference.export as export_module

    checkpoint, _ = exported
    capfd.readouterr()
    out = export_onnx(checkpoint, tmp_path / "opset17.onnx", opset=17)
    assert written_opset(out) == 17 and read_onnx_metadata(out)["opset"] == 17
    logged = capfd.readouterr().err
    assert "operator set version" not in logged and "version conversion" not in logged  # the exporters' notes
    assert logging.getLogger("torch.onnx").level == logging.NOTSET  # and the loggers are given back

    real = export_module._export_graph

    def keeps_its_native_opset(model, size, path, opset, dynamic_batch, **kwargs):
        # the check of the written opset does not depend on the exporter: the quicker TorchScript one
        real(model, size, path, 18, dynamic_batch, **{**kwargs, "dynamo": False})

    monkeypatch.setattr(export_module, "_export_graph", keeps_its_native_opset)
    with pytest.raises(ExportError, match="--opset 20: the exporter could only write opset 18"):
        export_onnx(checkpoint, tmp_path / "opset20.onnx", opset=20)
    assert not (tmp_path / "opset20.onnx").exists() and not onnx_sidecar(tmp_path / "opset20.onnx").exists()


def test_a_calibration_folder_with_no_readable_image_is_refused_before_exporting(tmp_path: Path) -> None:
    from polypseg.inference import deploy

    checkpoint = _save_tiny(tmp_path / "ckpt" / "tiny", seed=5)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    (calibration / "broken.jpg").write_bytes(b"not a jpeg")
    said: list[str] = []
    with pytest.raises(PolypsegError, match=f"no readable images in {calibration} to check the export on"):
        deploy.export_checkpoints(
            checkpoint, out=tmp_path / "m.onnx", int8=True, calibration=calibration, say=said.append
        )
    assert not (tmp_path / "m.onnx").exists() and any("broken.jpg" in line for line in said)


def test_the_int8_dice_check_leaves_out_the_calibration_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validating int8 on the images it was calibrated on would flatter it: those pairs are left out, and counted."""
    import functools
    import shutil

    from polypseg.inference import deploy, export

    monkeypatch.setattr(export, "_export_graph", functools.partial(export._export_graph, dynamo=False))
    checkpoint = _save_tiny(tmp_path / "ckpt" / "tiny", seed=5)
    data = write_synthetic_dataset(tmp_path / "data", n=4)
    calibration = tmp_path / "calibration"
    calibration.mkdir()
    for name in ("case00.jpg", "case01.jpg"):  # copies: the same images under another folder
        shutil.copy(data / "images" / name, calibration / name)
    (calibration / "broken.jpg").write_bytes(b"not a jpeg")  # named, and left out of the calibration
    said: list[str] = []
    [result] = deploy.export_checkpoints(
        checkpoint, out=tmp_path / "m.onnx", int8=True, calibration=calibration, validate=data, say=said.append
    )
    assert result["dice"]["n"] == 2 and result["dice"]["calibration_excluded"] == 2
    validation = read_onnx_metadata(Path(result["int8"]))["quantization"]["validation"]
    assert validation["n"] == 2 and validation["calibration_excluded"] == 2 and validation["calibration_overlap"] == 0
    assert any("not the 2 calibration images" in line for line in said)
    named = [line.split(": ")[0] for line in said if "broken.jpg" in line]
    assert named == ["verification", "calibration"], said  # left out of both, and said once for each
    assert any(line.endswith("calibrated on 2 images)") for line in said), said

    with pytest.raises(PolypsegError, match="--validate .*all 4 image/mask pairs are calibration images"):
        deploy.export_checkpoints(checkpoint, out=tmp_path / "all.onnx", int8=True, calibration=data, validate=data)
