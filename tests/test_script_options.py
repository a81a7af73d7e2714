"""Every option of seg-predict, seg-evaluate and seg-export is checked at start: a bad value ends the
tool with one line naming the key, exit code 1, no traceback, and nothing written.

Each case is one bad value among otherwise valid arguments, run as a user runs the tool."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acdc_tree import write_volume
from inference_runs import checkpoint, script, trained_run

# (arguments replacing or added to valid ones, the message's start); {tmp} is the test's folder,
# {ckpt} a real checkpoint (norm=bn, task multi), {volume} a real volume
PREDICT_CASES = [
    (["colour=red"], "error: unexpected argument 'colour=red' (known: ckpt, input, output,"),
    (["ckpt="], "error: missing ckpt=..."),
    (["device=cpu", "device=cpu"], "error: device= is given twice"),
    (["batch_size=0"], "error: batch_size=0: must be an integer >= 1"),
    (["batch_size=two"], "error: batch_size=two: must be an integer >= 1"),
    (["device=tpu"], "error: device=tpu: choose auto, cpu, cuda or cuda:<index>"),
    (["interpolation=cubic"], "error: interpolation=cubic: choose nearest or linear"),
    (["tta=maybe"], "error: tta=maybe: must be true or false"),
    (["overwrite=2"], "error: overwrite=2: must be true or false"),
    (["orientation=XYZ"], "error: orientation=XYZ: give auto or three axis codes"),
    (["orientation=RRS"], "error: orientation=RRS: give auto or three axis codes"),
    (["ckpt=[]"], "error: ckpt=[]: names no checkpoint"),
    (["ckpt={tmp}/missing.pt"], "error: ckpt={tmp}/missing.pt: no such file"),
    (["ckpt=[{ckpt},{ckpt}]"], "error: ckpt=[{ckpt},{ckpt}]: names {ckpt} twice"),
    (["ckpt={tmp}/notes.txt"], "error: ckpt={tmp}/notes.txt: not a checkpoint of this project"),
    (["input={tmp}/missing"], "error: input={tmp}/missing: no such file or folder"),
    (["input={tmp}/empty"], "error: input={tmp}/empty: no NIfTI image"),
    (["output={tmp}/notes.txt"], "error: output={tmp}/notes.txt: is a file, not a folder"),
    (["output={tmp}/notes.txt/pred"], "error: output={tmp}/notes.txt/pred: {tmp}/notes.txt is a file, not a folder"),
    (["domain=Siemens"], "error: domain=Siemens: the model (norm=bn) takes no domain"),
]

EVALUATE_CASES = [
    (["colour=red"], "error: unexpected argument 'colour=red' (known: pred, gt,"),
    (["gt="], "error: missing gt=..."),
    (["missing=zero", "missing=zero"], "error: missing= is given twice"),
    (["pred={tmp}/missing"], "error: pred={tmp}/missing: no such folder"),
    (["gt={tmp}/missing"], "error: gt={tmp}/missing: no such folder"),
    (["gt={tmp}/pred"], "error: gt={tmp}/pred: the same folder as pred="),
    (["gt={tmp}/empty"], "error: gt={tmp}/empty: no ground truth"),
    (["missing=skip"], "error: missing=skip: choose error or zero"),
    (["labels=rv:x"], "error: labels=rv:x: give name:value pairs with values 1-255"),
    (["labels=rv:0"], "error: labels=rv:0: give name:value pairs with values 1-255"),
    (["labels=rv:1,lv:1"], "error: labels=rv:1,lv:1: value 1 is given twice"),
    (["labels=rv:1,rv:3"], "error: labels=rv:1,rv:3: name rv is given twice"),
    (["out={tmp}/scores.txt"], "error: out={tmp}/scores.txt: must end in .csv"),
    (["out={tmp}/nowhere/scores.csv"], "error: out={tmp}/nowhere/scores.csv: folder {tmp}/nowhere does not exist"),
    (["out={tmp}/old.csv"], "error: out={tmp}/old.csv: exists (pass overwrite=true to replace it)"),
    (["overwrite=maybe"], "error: overwrite=maybe: must be true or false"),
]

EXPORT_CASES = [
    (["colour=red"], "error: unexpected argument 'colour=red' (known: ckpt, output,"),
    (["output="], "error: missing output=..."),
    (["ckpt={tmp}/missing.pt"], "error: ckpt={tmp}/missing.pt: no such file"),
    (["output={tmp}/model.pt"], "error: output={tmp}/model.pt: must end in .onnx"),
    (["output={tmp}/nowhere/model.onnx"],
     "error: output={tmp}/nowhere/model.onnx: folder {tmp}/nowhere does not exist"),
    (["output={tmp}/old.onnx"], "error: output={tmp}/old.onnx: exists (pass overwrite=true to replace it)"),
    (["opset=17"], "error: opset=17: choose an integer from 18 to"),
    (["opset=new"], "error: opset=new: choose an integer from 18 to"),
    (["check=maybe"], "error: check=maybe: must be true or false"),
    (["overwrite=2"], "error: overwrite=2: must be true or false"),
]


@pytest.fixture
def setting(acdc_root, tmp_path_factory, tmp_path):
    """A real checkpoint, volume, prediction folder and ground truth, and the odd files the cases name."""
    run = trained_run(tmp_path_factory, acdc_root, "data.task=multi")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a checkpoint\n")
    (tmp_path / "old.csv").write_text("someone's scores\n")
    (tmp_path / "old.onnx").write_text("someone's model\n")
    (tmp_path / "pred").mkdir()
    (tmp_path / "gt").mkdir()
    label = np.zeros((8, 8, 2), np.uint8)
    label[2:5, 2:5] = 3
    write_volume(tmp_path / "pred" / "case.nii.gz", label, dtype=np.uint8)
    write_volume(tmp_path / "gt" / "case_gt.nii.gz", label, dtype=np.uint8)
    return {"tmp": str(tmp_path), "ckpt": str(checkpoint(run)),
            "volume": str(acdc_root / "database" / "training" / "patient001" / "patient001_frame01.nii.gz")}


def arguments(valid: dict[str, str], case: list[str], values: dict[str, str]) -> list[str]:
    """The valid arguments with those the case names replaced (or, given twice, repeated); an empty
    value (``key=``) leaves the key out."""
    case = [argument.format(**values) for argument in case]
    keys = [argument.partition("=")[0] for argument in case]
    kept = [f"{key}={value}" for key, value in valid.items() if key not in keys]
    return kept + [argument for argument in case if not argument.endswith("=")]


def assert_refused(result, message: str, tmp_path, written: tuple[str, ...]) -> None:
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith(message), result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith(message) and (len(result.stderr.splitlines()) == 1 or "usage:" in result.stderr)
    for name in written:
        assert not (tmp_path / name).exists(), f"{name} was written"


@pytest.mark.slow
@pytest.mark.parametrize("case, message", PREDICT_CASES, ids=[" ".join(c) for c, _ in PREDICT_CASES])
def test_predict_refuses_a_bad_option_at_start(case, message, setting, tmp_path):
    valid = {"ckpt": setting["ckpt"], "input": setting["volume"], "output": f"{tmp_path}/out"}
    result = script("predict", *arguments(valid, case, setting))
    assert_refused(result, message.format(**setting), tmp_path, ("out",))


@pytest.mark.slow
def test_predict_refuses_cuda_where_there_is_none(setting, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device=cuda is valid here")
    result = script("predict", f"ckpt={setting['ckpt']}", f"input={setting['volume']}", f"output={tmp_path}/out",
                    "device=cuda")
    assert_refused(result, "error: device=cuda: CUDA is not available on this machine (use auto or cpu)",
                   tmp_path, ("out",))


@pytest.mark.slow
def test_predict_takes_an_empty_required_value_as_missing(setting, tmp_path):
    """``input=`` (say, an unset shell variable) is not the working directory."""
    result = script("predict", f"ckpt={setting['ckpt']}", "input=", f"output={tmp_path}/out")
    assert_refused(result, "error: missing input=...", tmp_path, ("out",))


@pytest.mark.slow
@pytest.mark.parametrize("case, message", EVALUATE_CASES, ids=[" ".join(c) for c, _ in EVALUATE_CASES])
def test_evaluate_refuses_a_bad_option_at_start(case, message, setting, tmp_path):
    valid = {"pred": f"{tmp_path}/pred", "gt": f"{tmp_path}/gt", "out": f"{tmp_path}/scores.csv"}
    result = script("evaluate", *arguments(valid, case, setting))
    assert_refused(result, message.format(**setting), tmp_path, ("scores.csv", "pred/evaluation.csv"))
    if "old.csv" in " ".join(case):
        assert (tmp_path / "old.csv").read_text() == "someone's scores\n"


@pytest.mark.slow
@pytest.mark.parametrize("case, message", EXPORT_CASES, ids=[" ".join(c) for c, _ in EXPORT_CASES])
def test_export_refuses_a_bad_option_at_start(case, message, setting, tmp_path):
    valid = {"ckpt": setting["ckpt"], "output": f"{tmp_path}/model.onnx"}
    result = script("export", *arguments(valid, case, setting))
    assert_refused(result, message.format(**setting), tmp_path, ("model.onnx",))
    if "old.onnx" in " ".join(case):
        assert (tmp_path / "old.onnx").read_text() == "someone's model\n"
