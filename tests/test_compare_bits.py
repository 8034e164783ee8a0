"""compare --bits: quantization sweeps scored against file size, checked against api.quantize run
directly with the same settings; evaluate on a quantized file."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnx_obs import api
from onnx_obs.compare import compare, parse_bits
from onnx_obs.errors import OnnxObsError
from onnx_obs.evaluate import evaluate
from tests.cli_checks import assert_one_line_error

SAMPLES = Path(__file__).resolve().parent.parent / "samples"
MLP = SAMPLES / "digits_mlp.onnx"
CALIB, EVAL = SAMPLES / "digits_mlp_calib.npz", SAMPLES / "digits_mlp_eval.npz"


def logits(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0].astype(np.float64)


@pytest.fixture(scope="module")
def sweep():
    return compare(str(MLP), str(CALIB), methods=["obs"], sparsities=[0.0, 0.5], bits=[8, 4],
                   quant_methods=["rtn", "gptq"], eval_data=str(EVAL), max_samples=32)


def test_one_row_per_quant_method_sparsity_and_bits(sweep):
    assert [(r.quant_method, r.method, r.sparsity, r.bits) for r in sweep.rows] == [
        (q, m, s, b) for q in ("rtn", "gptq") for s, m in ((0.0, "none"), (0.5, "obs")) for b in (8, 4)]
    assert [r.series for r in sweep.rows[:4]] == ["rtn"] * 2 + ["obs 0.5 + rtn"] * 2
    assert sweep.file_size == MLP.stat().st_size  # the original as written
    row = sweep.rows[0].to_dict()
    assert row["bits"] == 8 and row["quant_method"] == "rtn" and row["file_size"] > 0


@pytest.mark.parametrize("i", range(8))
def test_row_matches_quantize_run_directly(sweep, tmp_path, i):
    """Each row: the file api.quantize writes with the same settings has the row's size, and its
    onnxruntime outputs give the row's accuracy, agreement and relative MSE."""
    r = sweep.rows[i]
    extra = {"method": r.method} if r.sparsity > 0 else {}
    out = tmp_path / "q.onnx"
    api.quantize(str(MLP), str(CALIB), bits=r.bits, quant_method=r.quant_method, sparsity=r.sparsity,
                 max_samples=32, output=out, **extra)
    assert r.file_size == out.stat().st_size
    with np.load(EVAL) as z:
        x, y = z["input"], z["label"]
    a, b = logits(MLP.read_bytes(), x), logits(out.read_bytes(), x)
    assert r.accuracy == pytest.approx(np.mean(b.argmax(1) == y))
    assert r.top1_agreement == pytest.approx(np.mean(a.argmax(1) == b.argmax(1)))
    assert r.relative_mse == pytest.approx(np.sum((a - b) ** 2) / np.sum(a * a), rel=1e-6)
    assert r.loss == pytest.approx(sweep.baseline - r.accuracy)
    codes = [t for t in onnx.load(str(out)).graph.initializer if t.data_type in (
        onnx.TensorProto.INT8, onnx.TensorProto.INT4)]
    assert codes, "the written model holds integer codes"


def test_fewer_bits_make_smaller_files(sweep):
    for q in ("rtn", "gptq"):
        eight, four = (next(r for r in sweep.rows if (r.quant_method, r.sparsity, r.bits) == (q, 0.0, b))
                       for b in (8, 4))
        assert four.file_size < eight.file_size < sweep.file_size


def test_cli_bits_sweep_table_json_and_plot(cli, tmp_path):
    res = cli("compare", str(MLP), "--calib", str(CALIB), "--eval", str(EVAL), "--bits", "4",
              "--quant-methods", "rtn", "--max-samples", "16", "--json", str(tmp_path / "o.json"),
              "--plot", str(tmp_path / "size.png"))
    assert res.exit_code == 0, res.output
    d = json.loads((tmp_path / "o.json").read_text())
    assert [(r["quant_method"], r["bits"], r["sparsity"]) for r in d["rows"]] == [("rtn", 4, 0.0)]
    assert d["file_size"] == MLP.stat().st_size
    assert "file size" in res.stdout and "rtn" in res.stdout
    if (tmp_path / "size.png").exists():  # matplotlib installed
        assert (tmp_path / "size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--bits", "3"], ["--bits", "8"]),
    (["--bits", "8", "--quant-methods", "gptx"], ["gptx", "--quant-methods"]),
    (["--bits", "8", "--max-loss", "0.01"], ["--max-loss"]),
])
def test_cli_bits_errors(cli, args, words):
    assert_one_line_error(cli("compare", str(MLP), "--calib", str(CALIB), "--eval", str(EVAL), *args), *words)


def test_parse_bits():
    assert parse_bits("8, 4,8") == [8, 4]
    with pytest.raises(OnnxObsError):
        parse_bits("eight")


def test_evaluate_reads_a_quantized_file(tmp_path):
    out = tmp_path / "q4.onnx"
    api.quantize(str(MLP), bits=4, quant_method="rtn", output=out)
    r = evaluate(str(MLP), str(out), str(EVAL), repeats=0)
    with np.load(EVAL) as z:
        x, y = z["input"], z["label"]
    a, b = logits(MLP.read_bytes(), x), logits(out.read_bytes(), x)
    assert r.pruned.file_size == out.stat().st_size < MLP.stat().st_size
    assert r.pruned.accuracy == pytest.approx(np.mean(b.argmax(1) == y))
    assert r.outputs["logits"]["relative_mse"] == pytest.approx(np.sum((a - b) ** 2) / np.sum(a * a), rel=1e-6)
    assert r.outputs["logits"]["relative_mse"] > 0


def test_shared_hessians_give_the_direct_runs_result():
    """--no-sequential shares the original's Hessians across runs: each row must still be what
    api.quantize computes alone with sequential=False."""
    sweep = compare(str(MLP), str(CALIB), methods=["obs"], sparsities=[0.0, 0.5], bits=[4],
                    quant_methods=["gptq"], eval_data=str(EVAL), max_samples=32, sequential=False)
    with np.load(EVAL) as z:
        x = z["input"]
    a = logits(MLP.read_bytes(), x)
    for r in sweep.rows:
        extra = {"method": r.method} if r.sparsity > 0 else {}
        res = api.quantize(str(MLP), str(CALIB), bits=4, quant_method="gptq", sparsity=r.sparsity,
                           max_samples=32, sequential=False, **extra)
        b = logits(res.model.SerializeToString(), x)
        assert r.relative_mse == pytest.approx(np.sum((a - b) ** 2) / np.sum(a * a), rel=1e-9)
