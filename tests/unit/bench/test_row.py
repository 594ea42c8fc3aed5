"""Bench rows: the FLOP/MFU arithmetic against a hand computation (Llama-3-8B, the shape of
tests/unit/train/test_flops.py), percentiles, peaks, and the row files `collect` merges."""

import csv

import numpy as np
import pytest

from engine.bench.peak import gpu_peak
from engine.bench.row import FIELDS, BenchRow, percentile, read_rows, throughput, write_rows
from engine.config.loader import load_recipe
from engine.train.flops import flops_per_token


def test_llama3_8b_row_by_hand():
    """8 H100s, global batch 8 x 8192 tokens, 1.5 s per step."""
    model = load_recipe("configs/llama3-8b.yaml").model
    vocab, seq, devices, step_s = 128256, 8192, 8, 1.5
    # per token: 6 * 7,504,658,432 matmul weights + 6 * 32 layers * 2 * 32 heads * 128 * 8192
    palm = 6 * 7_504_658_432 + 6 * 32 * 2 * 32 * 128 * 8192
    assert palm == 57_912_852_480
    megatron = palm - 6 * 32 * 2 * 32 * 128 * 8192 // 2
    fields = throughput([step_s, step_s, 2.0], tokens_per_step=8 * seq, devices=devices,
                        flops_per_token=flops_per_token(model, vocab, seq),
                        flops_per_token_megatron=flops_per_token(model, vocab, seq,
                                                                 convention="megatron"),
                        peak_tflops=989.4)
    tokens_per_s = 8 * 8192 / 1.5  # the median step
    assert fields["tokens_per_s"] == pytest.approx(tokens_per_s)
    assert fields["tokens_per_s_per_device"] == pytest.approx(tokens_per_s / 8)
    assert fields["tflops_per_device"] == pytest.approx(palm * tokens_per_s / 8 / 1e12)
    assert fields["tflops_per_device"] == pytest.approx(316.28, abs=0.01)
    assert fields["mfu"] == pytest.approx(316.28 / 989.4, abs=1e-5)
    assert fields["tflops_per_device_megatron"] == pytest.approx(megatron * tokens_per_s / 8e12)
    assert fields["step_time_p90_s"] == pytest.approx(1.9)


def test_no_peak_no_mfu():
    fields = throughput([1.0], tokens_per_step=10, devices=1, flops_per_token=6.0,
                        flops_per_token_megatron=5.0, peak_tflops=None)
    assert fields["mfu"] is None and fields["mfu_megatron"] is None


@pytest.mark.parametrize("q", [0, 50, 90, 100])
def test_percentile_is_numpys(q):
    values = [0.3, 0.1, 0.9, 0.4, 0.25, 0.7]
    assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)))


@pytest.mark.parametrize("name,precision,tflops", [
    ("NVIDIA H200", "bf16", 989.4), ("NVIDIA H100 80GB HBM3", "fp8", 1978.9),
    ("NVIDIA H100 PCIe", "bf16", 756.5), ("NVIDIA A100-SXM4-80GB", "bf16", 312.0)])
def test_gpu_peaks_table(name, precision, tflops):
    assert gpu_peak(name, precision).tflops == tflops


def test_unknown_gpu_has_no_peak_and_says_where_to_add_it():
    peak = gpu_peak("NVIDIA GeForce GTX 1080", "bf16")
    assert peak.tflops is None and "GPU_PEAKS_TFLOPS" in peak.source


def _row(**changes) -> BenchRow:
    values = dict(
        system="engine", model="llama L2", layout="tp1 pp1 dp1", devices=1, device="cpu",
        precision="fp32", global_batch=4, micro_batch=2, seq_length=64, steps=3, warmup=1,
        tokens_per_s=100.0, tokens_per_s_per_device=100.0, step_time_median_s=2.56,
        step_time_p90_s=2.6, flops_per_token=1e6, tflops_per_device=1e-4,
        tflops_per_device_megatron=9e-5, peak_tflops_per_device=None, peak_source="none",
        mfu=None, mfu_megatron=None, peak_memory_gib=0.5, memory_kind="rss", loss_first=7.0,
        loss_last=6.5, kernels="csrc")
    values.update(changes)
    return BenchRow(**values)


def test_row_files_round_trip(tmp_path):
    rows = [_row(), _row(layout="tp2 pp1 dp1", devices=2, mfu=0.25)]
    write_rows(rows[:1], tmp_path / "one.json")
    write_rows(rows, tmp_path / "two.json")
    assert read_rows(tmp_path / "one.json") == rows[:1]
    assert read_rows(tmp_path / "two.json") == rows
    write_rows(rows, tmp_path / "table.csv")
    with open(tmp_path / "table.csv") as f:
        table = list(csv.DictReader(f))
    assert list(table[0]) == FIELDS and table[1]["layout"] == "tp2 pp1 dp1"


def test_unknown_row_field_is_an_error(tmp_path):
    (tmp_path / "bad.json").write_text('{"system": "engine", "tok_per_s": 1}')
    with pytest.raises(ValueError, match="unknown bench row fields"):
        read_rows(tmp_path / "bad.json")
