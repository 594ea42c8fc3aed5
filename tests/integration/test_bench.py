"""`engine bench` on tiny shapes: each subcommand runs and writes rows whose fields hold together
(throughput from the step time, FLOPs from the formula, MFU from the peak)."""

import json
from pathlib import Path

import pytest
import yaml

from engine.bench.cli import main as bench
from engine.bench.row import FIELDS, read_rows
from engine.config.loader import recipe_from_dict
from engine.train.flops import flops_per_token

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=128",
        "model.num_attention_heads=4", "model.num_query_groups=2", "model.vocab_size=1000",
        "model.max_position_embeddings=64", "data.seq_length=64", "train.micro_batch_size=2",
        "train.global_batch_size=4"]


def _check_row(row, *, system: str, devices: int = 1):
    assert row.system == system and row.devices == devices
    assert row.seq_length == 64 and row.global_batch == 4 and row.steps == 2
    assert row.tokens_per_s == pytest.approx(4 * 64 / row.step_time_median_s)
    assert row.step_time_p90_s >= row.step_time_median_s > 0
    model = recipe_from_dict({"model": {"num_layers": 2, "hidden_size": 64,
                                        "ffn_hidden_size": 128, "num_attention_heads": 4,
                                        "num_query_groups": 2}, "data": {"synthetic": True}}).model
    assert row.flops_per_token == flops_per_token(model, 1024, 64)  # vocab 1000 padded to 1024
    assert row.tflops_per_device == pytest.approx(
        row.flops_per_token * row.tokens_per_s_per_device / 1e12)
    assert row.tflops_per_device_megatron < row.tflops_per_device
    assert row.mfu == pytest.approx(row.tflops_per_device / row.peak_tflops_per_device)
    assert 0 < row.mfu < 1 and row.peak_memory_gib > 0
    assert 6.0 < row.loss_first < 8.0  # ln(1024) = 6.93: random init on random tokens
    # where the time went: batches (timed apart from the step) and GEMMs (a profiled step)
    assert 0 < row.data_wait_share < 1 and 0 < row.gemm_time_share < 1
    assert row.gemm_tflops_per_device > 0


def test_bench_train_prints_and_writes_one_row(tmp_path, capsys):
    assert bench(["train", "--steps", "2", "--warmup", "1", "--json",
                  str(tmp_path / "row.json"), *TINY]) == 0
    (row,) = read_rows(tmp_path / "row.json")
    _check_row(row, system="engine")
    assert row.layout == "tp1 pp1 dp1" and row.kernels in ("csrc", "reference")
    assert "measured fp32 GEMM" in row.peak_source
    out = capsys.readouterr().out
    assert "tok/s" in out and "MFU" in out and "6*N_matmul" in out
    assert list(json.loads((tmp_path / "row.json").read_text())) == FIELDS


def test_bench_kernels(tmp_path, capsys):
    assert bench(["kernels", "--tokens", "128", "--batch", "2", "--hidden-size", "64",
                  "--ffn-hidden-size", "96", "--num-attention-heads", "4", "--kv-channels", "16",
                  "--vocab-size", "500", "--repeats", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["kernel"] for r in rows] == ["rms_norm", "swiglu", "rope", "linear_cross_entropy"]
    for r in rows:
        assert r["reference_ms"] > 0 and r["fused_ms"] > 0
        assert r["speedup"] == pytest.approx(r["reference_ms"] / r["fused_ms"])
        assert r["error"] < 1 and r["max_abs_error"] >= 0  # the outputs were compared too
    out = capsys.readouterr().out
    assert "speedup" in out and out.count(" ok") == 4 and "FAILED" not in out


def test_bench_kernels_fails_a_wrong_kernel(monkeypatch, capsys):
    """The correctness column could fail: a fused RMSNorm off by 1% exits 1."""
    from engine.bench import kernels
    from engine.kernels.rmsnorm import fused_rms_norm

    monkeypatch.setattr(kernels, "fused_rms_norm", lambda x, w, eps: fused_rms_norm(x, w, eps) *
                        1.01)
    assert bench(["kernels", "--tokens", "64", "--batch", "2", "--hidden-size", "32",
                  "--ffn-hidden-size", "48", "--num-attention-heads", "2", "--kv-channels", "16",
                  "--vocab-size", "100", "--repeats", "1"]) == 1
    assert "FAILED" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_compare_runs_three_systems(tmp_path):
    out = tmp_path / "cmp"
    assert bench(["compare", "--steps", "2", "--warmup", "1", "--threads", "1", "--out",
                  str(out), *TINY]) == 0
    data = json.loads((out / "compare.json").read_text())
    systems = [r["system"] for r in data["rows"]]
    assert systems == ["engine", "transformers", "megatron-core"]
    for system in systems:
        (row,) = read_rows(out / "rows" / f"{system}.json")
        _check_row(row, system=row.system)
        assert row.device == "cpu (1 thread)"
    peaks = {r["peak_tflops_per_device"] for r in data["rows"]}
    assert len(peaks) == 1  # one peak, measured once, for every system
    assert set(data["ratios"]) == {"engine/transformers", "engine/megatron-core"}
    ratio = data["round_ratios"]["engine/transformers"]
    assert len(ratio["per_round"]) == 1 and ratio["min"] == ratio["median"] == ratio["max"]
    assert (out / "compare.csv").is_file() and (out / "compare.png").stat().st_size > 1000


@pytest.mark.slow
@pytest.mark.dist
def test_bench_sweep_over_two_layouts_and_collect(make_recipe, tmp_path):
    recipe = make_recipe()
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    assert bench(["sweep", "--config", str(config), "--layout", "tp=1", "--layout", "tp=2",
                  "--steps", "2", "--warmup", "1", "--threads", "2", "--out", str(out)]) == 0
    rows = read_rows(out / "sweep.json")
    assert [(r.layout, r.devices) for r in rows] == [("tp1 pp1 dp1", 1), ("tp2 pp1 dp1", 2)]
    # Same model, same tokens: the layouts' losses agree (TP equivalence, through the bench).
    assert rows[0].loss_first == pytest.approx(rows[1].loss_first, abs=1e-5)
    assert bench(["collect", *map(str, sorted((out / "rows").glob("*.json"))), "--out",
                  str(tmp_path / "table.csv")]) == 0
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 3
