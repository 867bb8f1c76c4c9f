"""analysis/bench_finetune.py's CPU paths -- the runs' commands validated and planned, the metrics parsed, the summary
(speed-up, tokens/s per GPU, scaling efficiency), the JSON written and continued -- and the finetuning figure of
analysis/plot_speedups.py, on a hand-made fixture (tests/fixtures/finetune_fixture_8gpu.json)."""

import json
import shlex
from pathlib import Path

import matplotlib.pyplot as plt
import pytest
from scripts import load_script

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "finetune_fixture_8gpu.json"



def test_runs_of_the_7b_benchmark_validate_and_plan():
    """The full-depth runs use the shipped configs (hybrid: layers 10-20 full; full: all 32), random weights, and the
    8-GPU plan fits an H200; the shrunken spec keeps the shape with fewer layers."""
    bench = load_script("analysis/bench_finetune.py")
    hybrid = bench.plan_run(bench.run_args("7b", 131072, "hybrid", 8, 3, "/tmp/x", "/tmp/y"), validate=True)
    full = bench.plan_run(bench.run_args("7b", 131072, "full", 8, 3, "/tmp/x", "/tmp/y"), validate=True)
    assert hybrid.shape.full_layers == tuple(range(10, 21)) and full.shape.full_layers == tuple(range(32))
    assert hybrid.world_size == 8 and hybrid.loss_chunks == 16 and hybrid.optimizer == "torch.optim.AdamW"
    assert hybrid.peak == full.peak < 139.8 * 2**30  # the plan does not depend on the pattern: O(S) both
    small = bench.plan_run(bench.run_args("7b6l", 32768, "hybrid", 2, 3, "/tmp/x", "/tmp/y"), validate=True)
    assert small.shape.num_layers == 6 and small.shape.full_layers == (2, 3) and small.shape.dim == 4096
    args = bench.run_args("7b", 65536, "full", 8, 3, "/tmp/x", "/tmp/y")
    assert args[:4] == ["tune", "run", "--nproc_per_node", "8"] and "recipes/configs/llama2_7b_full_128k.yaml" in args
    assert {"seq_len=65536", "model.max_seq_len=65536", "checkpoint.base_dir=null", "compile=false"} <= set(args)
    with pytest.raises(ValueError, match=r"model must be 1b, 3b, 7b or 7b<N>l \(N in 1..32 layers\), got '7b40l'"):
        bench.parse_spec("7b40l-32k")
    with pytest.raises(ValueError, match=r"spec must be <model>-<K tokens>"):
        bench.parse_spec("7b-128")


def test_metrics_and_summary():
    bench = load_script("analysis/bench_finetune.py")
    text = ("Step 1 | loss:10.5 lr:2e-05 tokens_per_second_per_rank:1000 peak_memory_alloc:70.5 \n"
            "Step 3 | loss:10.1 lr:2e-05 tokens_per_second_per_rank:6553.6 peak_memory_alloc:66.0 "
            "peak_memory_reserved:80.0 \nnoise\n"
            "Step 2 | loss:10.3 lr:2e-05 tokens_per_second_per_rank:6553.6 peak_memory_alloc:66.5 "
            "peak_memory_reserved:79.0 \n")
    metrics = bench.parse_metrics(text)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[0]["lr"] == 2e-05
    row = bench.summarize_run({"seq_len": 131072}, metrics)
    assert row["step_s_median"] == pytest.approx(20.0) and row["tokens_per_s_per_rank_median"] == 6553.6
    assert row["peak_memory_alloc_gib"] == 66.5 and row["loss"] == [10.5, 10.3, 10.1]  # step 1 (compiles) left out

    s = bench.summarize(json.loads(FIXTURE.read_text())["runs"])
    pairs = {(p["seq_len"], p["nproc"]): p for p in s["hybrid_vs_full"]}
    assert set(pairs) == {(32768, 8), (131072, 8), (32768, 2)}  # 128K full on 2 GPUs ran out of memory
    assert pairs[(131072, 8)]["speedup"] == pytest.approx(35.2 / 22.0)
    assert pairs[(131072, 8)]["hybrid_tokens_per_s_per_gpu"] == pytest.approx(131072 / 22.0)
    eff = {(c["seq_len"], c["layout"]): c["efficiency"] for c in s["scaling"]}
    assert eff[(32768, "hybrid")] == {"2": 1.0, "8": pytest.approx(4.2 / 4.4)}
    assert (131072, "full") not in eff  # measured at one GPU count only


def test_json_is_written_after_each_run_and_continued(tmp_path, monkeypatch, capsys):
    """A second call with the same --out keeps the successful runs and runs only the rest (a machine that stops a
    long call gets the same command again); the exit code says whether every run succeeded."""
    import torch

    bench = load_script("analysis/bench_finetune.py")
    fixture = {r["spec"]: r for r in json.loads(FIXTURE.read_text())["runs"]}
    calls = []

    def fake_run(name, seq, layout, nproc, steps, scratch, timeout_s, backend="default"):
        tag = f"{name}-{seq // 1024}k-{layout}-x{nproc}"
        calls.append(tag)
        return dict(fixture[tag])

    monkeypatch.setattr(bench, "run_one", fake_run)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fixture GPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    out = tmp_path / "ft.json"
    argv = ["--nproc", "2", "--specs", "7b-128k", "--out", str(out)]
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 1 and calls == ["7b-128k-hybrid-x2", "7b-128k-full-x2"]
    first = json.loads(out.read_text())
    assert not first["complete"] and first["runs"][1]["oom"] and first["gpus"] == 8
    fixture["7b-128k-full-x2"].update(rc=0, step_s_median=40.0, tokens_per_s_per_rank_median=3276.8,
                                      peak_memory_alloc_gib=90.0)  # say, after a fix: the rerun succeeds
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 0 and calls == ["7b-128k-hybrid-x2", "7b-128k-full-x2", "7b-128k-full-x2"]
    second = json.loads(out.read_text())
    assert second["complete"] and second["summary"]["hybrid_vs_full"][0]["speedup"] == pytest.approx(40.0 / 21.0)
    assert "speedup 1.90x" in capsys.readouterr().out


def test_plan_only_prints_every_run(capsys):
    bench = load_script("analysis/bench_finetune.py")
    bench.main(["--plan-only", "--nproc", "8", "--specs", "7b-32k", "--layouts", "hybrid"])
    out = capsys.readouterr().out
    assert "### 7b-32k hybrid on 8 GPU(s)" in out and "recipes/configs/llama2_7b_longgen_128k.yaml" in out
    assert "peak (estimate)" in out and "fits 139.8 GiB" in out
    with pytest.raises(SystemExit, match=r"error: config field 'seq_len': 131072 x batch_size 1 needs an estimated"):
        bench.main(["--plan-only", "--nproc", "1", "--specs", "7b-128k", "--layouts", "full", "--gpu-memory-gib", "80"])


def test_finetune_figure_from_fixture(tmp_path):
    plot = load_script("analysis/plot_speedups.py")
    drawn = plot.plot_finetune(plot.load(str(FIXTURE)), tmp_path)
    fig, path, labels = drawn["Fixture GPU"]
    assert path.exists() and path.stat().st_size > 10_000 and path.name == "finetune_Fixture_GPU.png"
    assert set(labels["whole recipe step"]) == {"7b x2 hybrid", "7b x2 full", "7b x8 hybrid", "7b x8 full"}
    assert {"7b x8", "7b x2", "paper 1.55x (128K)"} <= set(labels["speed-up"])
    assert {"7b x8 hybrid measured", "7b x8 hybrid plan (estimate)"} <= set(labels["peak memory per GPU"])
    speed = next(ln for ln in fig.axes[1].get_lines() if ln.get_label() == "7b x8")
    assert list(speed.get_xdata()) == [32768, 131072] and speed.get_ydata()[1] == pytest.approx(35.2 / 22.0)
    speed2 = next(ln for ln in fig.axes[1].get_lines() if ln.get_label() == "7b x2")
    assert list(speed2.get_xdata()) == [32768]  # the OOM run is not drawn ...
    assert "7b-128k-full-x2: OOM" in fig.texts[-1].get_text()  # ... but listed
    scaling = next(ln for ln in fig.axes[3].get_lines() if ln.get_label() == "7b 32K hybrid")
    assert list(scaling.get_xdata()) == [2, 8] and scaling.get_ydata()[1] == pytest.approx(4.2 / 4.4)
    plt.close(fig)
    with pytest.raises(SystemExit):
        plot.main(["--finetune", str(tmp_path / "none_*.json"), "--out", str(tmp_path)])


def test_finetune_figure_labels_packed_file_records_apart(tmp_path):
    """A record trained on packed short files (no dataset.min_document_tokens in its command: document masks) is
    drawn as its own series beside the one-document record of the same spec, never merged into it."""
    plot = load_script("analysis/plot_speedups.py")
    res = plot.load(str(FIXTURE))
    old = json.loads(json.dumps(res[0]))
    for r in old["runs"]:
        r["command"] = "tune run ..."
        if "step_s_median" in r:
            r["step_s_median"] = 1.0  # other values than the one-document records': a merge would show
    drawn = plot.plot_finetune(res + [old], tmp_path)
    fig, _, labels = drawn["Fixture GPU"]
    assert {"7b x8 hybrid", "7b packed files x8 hybrid", "7b packed files x8 full"} <= set(labels["whole recipe step"])
    speed = next(ln for ln in fig.axes[1].get_lines() if ln.get_label() == "7b x8")  # still the fixture's own ratio
    assert speed.get_ydata()[1] == pytest.approx(35.2 / 22.0)
    plt.close(fig)
