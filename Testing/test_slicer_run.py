"""slicer_run (what the module Logic's `process` calls) end to end on real MRML and the shipped model,
through the engine process (medgen.worker) as in Slicer.

The sample is the MNI152 template; examples are a few of its labelled axial slices, as a user
would paint them. Runs are cropped to a few slices around the examples to keep the suite short.
One warm engine process serves the file; the worker protocol itself (cancel timing, crashes,
GIL-held polling) is tested in test_slicer_worker.py.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from test_slicer_scene import T1, TISSUE, Scene, mrml, slicer  # noqa: F401

pytest.importorskip("torch")
from MedicalGeneralistLib import slicer_io  # noqa: E402
from MedicalGeneralistLib import slicer_run as sr  # noqa: E402
from MedicalGeneralistLib.worker_client import WorkerProcess  # noqa: E402
from medgen.core.errors import InputError  # noqa: E402
from medgen.io.images import read_volume  # noqa: E402

NAMES = ["grey matter", "white matter"]
pytestmark = [pytest.mark.slicer, pytest.mark.model]


@pytest.fixture(scope="module")
def engine():
    """One warm engine process (sys.executable here, PythonSlicer in Slicer) for the whole file."""
    worker = WorkerProcess()
    yield worker
    worker.stop()


from medgen.metrics import dice as _dice


def _request(mrml: Scene, **changes) -> sr.RunRequest:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    base = dict(input_volume=t1, task="segment", examples=[slicer_io.ExampleSlice(t1, 0, 36, seg), slicer_io.ExampleSlice(t1, 0, 42, seg)],
                segment_names=NAMES, device="cpu", modality="mr", range_mode="around", range_slices=2)
    return sr.RunRequest(**{**base, **changes})


def test_process_writes_a_new_segmentation_on_the_input_grid(mrml: Scene, engine) -> None:
    request = _request(mrml)
    t1 = request.input_volume
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml.scene)
    folder = shn.CreateFolderItem(shn.GetSceneItemID(), "MNI152")
    shn.CreateItem(folder, t1)
    before = mrml.snapshot()
    fractions = []
    out = sr.process(request, engine, progress=lambda f, m: fractions.append(f))
    assert out.IsA("vtkMRMLSegmentationNode") and out.GetName() == "t1 segmentation"
    assert out.GetID() not in before["ids"]
    after = mrml.snapshot()["arrays"]
    assert {k: after[k] for k in before["arrays"]} == before["arrays"]  # nothing else changed
    assert slicer_io.segment_names(out) == NAMES
    assert slicer_io.segment_color(out, "grey matter") == pytest.approx((0.9, 0.6, 0.2))
    assert out.GetNodeReference(out.GetReferenceImageGeometryReferenceRole()) is t1
    assert shn.GetItemParent(shn.GetItemByDataNode(out)) == folder
    assert fractions and fractions[-1] == pytest.approx(1.0) and fractions == sorted(fractions)
    masks = slicer_io.segment_masks(out, NAMES, t1)
    tissue = read_volume(TISSUE, label=True).array
    for value, name in enumerate(NAMES, 1):
        for given in (36, 42):  # labelled slices are copied exactly
            np.testing.assert_array_equal(masks[name][given], tissue[given] == value)
        assert not masks[name][:34].any() and not masks[name][45:].any()  # range: 2 slices around
        rest = [34, 35, 37, 38, 39, 40, 41, 43, 44]
        assert _dice(masks[name][rest], tissue[rest] == value) > 0.5  # aligned (starter model: ~0.6-0.7)


def test_whole_volume_propagation_from_three_slices(mrml: Scene, engine) -> None:
    t1 = mrml.load_volume(T1, "t1")
    seg = mrml.tissue_segmentation(t1)
    request = sr.RunRequest(t1, "segment", [slicer_io.ExampleSlice(t1, 0, i, seg) for i in (24, 40, 56)], ["white matter"],
                            device="cpu", modality="auto")
    out = sr.process(request, engine)
    mask = slicer_io.segment_masks(out, ["white matter"], t1)["white matter"]
    tissue = read_volume(TISSUE, label=True).array == 2
    assert mask.shape == tissue.shape and mask[10:70].any()
    assert _dice(mask[20:60], tissue[20:60]) > 0.5


def test_results_go_into_an_existing_segmentation_without_touching_it(mrml: Scene, engine) -> None:
    request = _request(mrml, segment_names=["white matter"])
    seg = request.examples[0].target
    request.output_segmentation = seg
    before = mrml.snapshot()
    out = sr.process(request, engine)
    assert out is seg
    after = mrml.snapshot()
    assert after["ids"] == before["ids"]  # no node added
    assert {k: v for k, v in after["arrays"].items() if k in before["arrays"]} == before["arrays"]
    assert slicer_io.segment_names(seg) == ["grey matter", "white matter", "white matter (2)"]


def test_cancelled_run_leaves_the_scene_unchanged(mrml: Scene) -> None:
    request = _request(mrml, range_mode="whole", mode="independent")
    before = mrml.snapshot()
    worker = WorkerProcess()
    assert sr.process(request, worker, cancel=lambda: True) is None
    assert mrml.snapshot() == before and not worker.alive
    seen = []  # cancel part-way through, after the engine reported real work

    assert sr.process(request, worker, progress=lambda f, m: seen.append(f),
                      cancel=lambda: bool(seen) and seen[-1] > 0) is None
    assert seen[-1] > 0 and mrml.snapshot() == before and not worker.alive


def test_polled_run_reports_progress_then_results(mrml: Scene, engine) -> None:
    prepared = sr.prepare(_request(mrml, range_slices=0, range_mode="between"))
    job = sr.submit(prepared, engine)
    fractions = []
    while not job.poll():
        fractions.append(job.fraction)
        time.sleep(0.02)
    assert job.state == "done", job.error
    assert fractions == sorted(fractions) and job.fraction == pytest.approx(1.0)
    result = sr.collect(prepared, job)
    assert [name for name, _mask in result.segments] == NAMES
    assert all(mask.shape == prepared.full_shape for _name, mask in result.segments)
    job.discard()
    assert not job.folder.exists()


def test_engine_errors_reach_the_gui_as_one_message(mrml: Scene, engine) -> None:
    request = _request(mrml, model="no-such-model")
    before = mrml.snapshot()
    with pytest.raises(InputError, match="unknown model 'no-such-model'"):
        sr.process(request, engine)
    assert mrml.snapshot() == before
    assert engine.alive  # a user error does not end the warm process


def test_denoise_writes_a_new_volume_with_the_input_geometry(mrml: Scene, engine) -> None:
    clean = mrml.load_volume(T1, "clean")
    array = slicer.util.arrayFromVolume(clean).astype(np.float32)
    noisy_array = array + np.random.default_rng(0).normal(0, 8, array.shape).astype(np.float32)
    noisy = mrml.add_volume(noisy_array, slicer_io.ijk_to_ras(clean), "noisy")
    request = sr.RunRequest(noisy, "denoise", [slicer_io.ExampleSlice(noisy, 0, 40, clean)], device="cpu", modality="mr",
                            range_mode="around", range_slices=1)
    out = sr.process(request, engine)
    assert out.IsA("vtkMRMLScalarVolumeNode") and out.GetName() == "noisy denoised"
    np.testing.assert_allclose(slicer_io.ijk_to_ras(out), slicer_io.ijk_to_ras(noisy))
    result = slicer.util.arrayFromVolume(out)
    np.testing.assert_array_equal(result[:39], noisy_array[:39])  # outside the range: the input as is
    assert result.shape == noisy_array.shape and np.isfinite(result).all()
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(noisy), noisy_array)  # input untouched


def test_inpaint_without_examples_uses_the_mask(mrml: Scene, engine) -> None:
    t1 = mrml.load_volume(T1, "t1")
    holes = slicer_io.new_segmentation_node(t1, "holes")
    mask = np.zeros(slicer.util.arrayFromVolume(t1).shape, bool)
    mask[40, 40:50, 30:40] = True
    slicer_io.add_segments(holes, t1, [("hole", None, mask)])
    original = slicer.util.arrayFromVolume(t1).copy()
    out = sr.process(sr.RunRequest(t1, "inpaint", mask_segmentation=holes, device="cpu", modality="mr"), engine)
    result = slicer.util.arrayFromVolume(out)
    np.testing.assert_array_equal(result[~mask], original[~mask].astype(result.dtype))
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(t1), original)


def test_request_mistakes_are_reported_before_the_model_runs(mrml: Scene) -> None:
    with pytest.raises(InputError, match="Add current slice"):
        sr.prepare(_request(mrml, examples=[]))
    with pytest.raises(InputError, match="unknown range"):
        sr.prepare(_request(mrml, range_mode="some"))
    with pytest.raises(InputError, match="needs a mask"):
        sr.prepare(_request(mrml, task="inpaint"))
    t1 = mrml.load_volume(T1, "t1")
    with pytest.raises(InputError, match="is not a segmentation"):
        sr.prepare(_request(mrml, output_segmentation=t1))


def test_input_removed_during_the_run_writes_nothing(mrml: Scene, engine) -> None:
    request = _request(mrml, range_mode="between")
    prepared = sr.prepare(request)
    job = sr.submit(prepared, engine)
    assert job.wait(300) and job.state == "done", job.error
    result = sr.collect(prepared, job)
    mrml.scene.RemoveNode(request.input_volume)
    count = mrml.scene.GetNumberOfNodes()
    with pytest.raises(InputError, match="removed from the scene during the run"):
        sr.write(prepared, result)
    assert mrml.scene.GetNumberOfNodes() == count
