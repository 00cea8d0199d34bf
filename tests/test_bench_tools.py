"""The benchmark programs run end to end on tiny real models (their figures are not judged
here: speed targets live in the benchmarks' own output, never in test assertions)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.tools import benchmark, families_bench


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3-embed", "tiny-bonsai"])
def test_benchmark_measures_each_family(
    preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = gw.write_model(tmp_path / f"{preset}.gguf", gw.PRESETS[preset], 5)
    args = benchmark.parse_args(
        [str(path), "--rounds", "2", "--batches", "1,2", "--prefill-runs", "1",
         "--prompt", "16", "--bw-mb", "16", "--threads", "2"]
    )
    summary: dict = {}
    assert benchmark.run(args, summary) == 0
    out = capsys.readouterr().out
    assert "single-stream / limit" in out and "batch 2 (aggregate)" in out
    for key in ("bandwidth", "limit", "decode_1", "decode_n", "share_n", "prefill"):
        assert summary[key] > 0, key
    assert summary["batches"][2] > 0
    # bytes per token: at least every weight once (the file holds little else)
    assert summary["bytes_per_token"] > 0.5 * path.stat().st_size


def test_families_bench_refuses_an_unknown_preset(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        families_bench.main(["--only", "falcon-h9"])
    assert exc.value.code == 2
    assert "unknown preset(s): falcon-h9" in capsys.readouterr().err


def test_every_family_of_the_families_bench_is_a_writer_preset() -> None:
    for _, preset in families_bench.FAMILIES:
        shape = gw.PRESETS[preset]
        shape.validate()
    presets = [preset for _, preset in families_bench.FAMILIES]
    assert presets[0] == "full"  # the yardstick comes first
    assert gw.PRESETS["falcon-e-3b"].is_llama
    assert gw.PRESET_PRE_TOKENIZER["falcon-e-3b"] == "falcon_e"
