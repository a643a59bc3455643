"""The moekit CLI: bench (with an --hf-config shape so it stays fast), JSON/plot/markdown outputs, info, and the
one-line exit-2 answer to every user mistake, given before any sweep."""

import argparse
import json
import os
import re
import sys

import pytest
import torch

import moekit
import moekit.bench.run
import moekit.kernel
import moekit.cli as cli
from moekit.cli import main
from moekit.testing import QUANT_TOLERANCES

TINY = {"model_type": "qwen2_moe", "hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2,
        "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "intermediate_size": 128,
        "hidden_act": "silu"}
FAST = ["--tokens", "1", "--dtype", "fp32", "--backend", "torch", "--no-baselines"]


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    return path


@pytest.fixture
def no_sweep(monkeypatch):
    """Fail the test if a bench gets as far as making weights: user errors must be caught before."""
    def boom(*args, **kwargs):
        raise AssertionError("the sweep started before the arguments were checked")

    monkeypatch.setattr(moekit.bench.run, "make_weights", boom)


def _usage_error(capsys, argv) -> str:
    """Run ``argv``; it must exit 2 with one line on stderr; returns that line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err and "Traceback" not in err
    return err


def test_bench_writes_table_json_plot_markdown(tiny_config, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    rc = main(["bench", "--hf-config", str(tiny_config), "--tokens", "1,5", "--dtype", "fp32",
               "--backend", "torch", "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "moekit us" in text and "qwen2_moe" in text
    doc = json.loads(out_json.read_text())
    assert [r["tokens"] for r in doc["rows"]] == [1, 5]
    for r in doc["rows"]:
        assert r["moekit_us"] > 0 and r["max_rel_err"] < 1e-5
        assert r["eager_us"] > 0
    assert out_png.stat().st_size > 1000
    md = out_md.read_text().splitlines()
    assert md[0].startswith("| shape | T | moekit us |")
    assert len({line.count("|") for line in md}) == 1  # every row has the header's columns
    again = tmp_path / "again.md"
    assert main(["plot", str(out_json), "--markdown", str(again)]) == 0
    assert again.read_text() == out_md.read_text()


def test_bench_runs_a_non_gated_relu2_config(tmp_path, capsys):
    # Nemotron-H: I rows of w13 (not 2I), relu2; the benchmark's own reference check must agree with it.
    path = tmp_path / "nemotron.json"
    path.write_text(json.dumps({"model_type": "nemotron_h", "hidden_size": 64, "n_routed_experts": 8,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 32, "mlp_hidden_act": "relu2"}))
    out = tmp_path / "b.json"
    assert main(["bench", "--hf-config", str(path), *FAST, "--json", str(out)]) == 0
    row = json.loads(out.read_text())["rows"][0]
    assert row["shape"] == "nemotron_h" and row["max_rel_err"] < 1e-5
    # T=1, K=2: 2 * K * (I + I) * H flops, where a gated activation would count 2 * K * (2I + I) * H.
    assert row["tflops"] == pytest.approx(2 * 2 * (32 + 32) * 64 / row["moekit_us"] * 1e-6)


@pytest.mark.parametrize(
    "config, match",
    [
        ({**TINY, "text_config": None, "num_experts_per_tok": 8, "num_experts": 4},
         "top-k 8 exceeds the expert count 4"),
        ({**TINY, "moe_topk": [2, 2], "num_experts_per_tok": None}, "moe_topk must be a positive int"),
        ([1, 2], "expected a JSON object"),
        ({**TINY, "hidden_act": "quick_gelu"}, "hidden_act"),
    ],
)
def test_bench_rejects_bad_hf_configs(tmp_path, capsys, no_sweep, config, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    err = _usage_error(capsys, ["bench", "--hf-config", str(path)])
    assert match in err and str(path) in err


def test_malformed_json_names_the_file(tmp_path, capsys, no_sweep):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert str(bad) in _usage_error(capsys, ["bench", "--hf-config", str(bad)])
    assert str(bad) in _usage_error(capsys, ["plot", str(bad)])
    not_bench = tmp_path / "other.json"
    not_bench.write_text('{"rows": [{"shape": "x"}]}')
    assert "moekit bench --json" in _usage_error(capsys, ["plot", str(not_bench)])
    missing = tmp_path / "missing.json"
    assert str(missing) in _usage_error(capsys, ["plot", str(missing)])
    assert str(missing) in _usage_error(capsys, ["bench", "--hf-config", str(missing)])


def test_bench_rejects_bad_arguments(capsys, no_sweep, tiny_config):
    assert "unknown" in _usage_error(capsys, ["bench", "--preset", "llama-moe"])
    assert "--tokens" in _usage_error(capsys, ["bench", "--tokens", "a,b"])
    assert "not both" in _usage_error(capsys, ["bench", "--preset", "olmoe-1b-7b", "--hf-config", str(tiny_config)])
    assert "--device" in _usage_error(capsys, ["bench", "--device", "tpu"])
    assert "--device" in _usage_error(capsys, ["bench", "--device", "not a device"])
    assert main(["bench", "--dtype", "fp8"]) == 2  # argparse's own choice check, same status
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_bench_on_cuda_without_cuda(capsys, no_sweep):
    for device in ("cuda", "cuda:1"):
        assert "CUDA is not available" in _usage_error(capsys, ["bench", "--device", device])


def test_bench_refuses_a_backend_the_device_lacks(capsys, no_sweep, tiny_config, monkeypatch):
    # A CPU without Triton's interpreter runs only the torch backend.
    monkeypatch.setattr(moekit.kernel, "available_backends", lambda device: ["torch"])
    assert "--backend triton" in _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), "--device", "cpu",
                                                       "--backend", "triton"])


@pytest.mark.parametrize("flag", ["--json", "--markdown", "--plot"])
def test_outputs_into_a_missing_folder_are_refused_before_the_sweep(tmp_path, capsys, no_sweep, tiny_config, flag):
    target = tmp_path / "nowhere" / "out.file"
    err = _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), *FAST, flag, str(target)])
    assert flag in err and "does not exist" in err
    assert "is a folder" in _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), *FAST, flag, str(tmp_path)])


def test_plot_without_matplotlib_names_the_extra(tmp_path, capsys, no_sweep, tiny_config, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    err = _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), *FAST, "--plot", str(tmp_path / "p.png")])
    assert "pip install 'moekit[bench]'" in err


def test_progress_without_tqdm_runs_silently(monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    assert cli._progress([1, 2]) == [1, 2]


def test_a_preset_that_cannot_fit_is_refused_with_its_size(capsys, no_sweep, monkeypatch):
    # deepseek-v3's bf16 expert weights: 256 * 3 * 7168 * 2048 * 2 B = 22.5 GB
    monkeypatch.setattr(cli, "device_memory_bytes", lambda device: 16 * 10**9)
    err = _usage_error(capsys, ["bench", "--preset", "deepseek-v3", "--device", "cpu"])
    assert "deepseek-v3" in err and "22.5 GB" in err and "16.0 GB" in err


def test_device_memory_on_cpu_is_the_machines_ram():
    ram = cli.device_memory_bytes(torch.device("cpu"))
    assert ram is None or ram > 2**28


def test_info_and_version(capsys):
    assert main(["info"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "torch" in doc["backends"]["cpu"] and doc["torch"]
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"


def test_every_flag_has_help_and_the_epilog_gives_the_exit_codes(capsys):
    parsers = [cli.build_parser()]
    for parser in parsers:  # grows with the subcommands' parsers
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parsers += action.choices.values()
                assert all(a.help for a in action._choices_actions), "every command has a help line"
            else:
                assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help"
    assert main(["bench", "--help"]) == 0
    out = capsys.readouterr().out
    assert "exit status" in out and "2  a usage or input error" in out


def test_bench_json_records_the_command_it_ran(tiny_config, tmp_path):
    # meta.command is how a JSON file is reproduced: it must be this call's arguments, not the host process's
    # sys.argv (pytest's, or any program's that calls main(argv)).
    out_json = tmp_path / "b.json"
    argv = ["bench", "--hf-config", str(tiny_config), *FAST, "--json", str(out_json)]
    assert main(argv) == 0
    assert json.loads(out_json.read_text())["meta"]["command"] == "moekit " + " ".join(argv)


def test_bench_flags_rows_off_the_reference_without_failing(tiny_config, tmp_path, capsys, monkeypatch):
    # A wrong kernel used to be a fast row with nothing flagged: now "!" in the table and a warning naming the row
    # on stderr, the run still done (exit 0), the JSON keeps the tolerance so `moekit plot` flags it again.
    monkeypatch.setattr(moekit.bench.run, "reference_error", lambda *a: 0.5)
    out_json = tmp_path / "b.json"
    assert main(["bench", "--hf-config", str(tiny_config), *FAST, "--json", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "5.00e-01!" in captured.out
    assert "moekit bench: warning: moekit's output is off the reference" in captured.err
    assert "qwen2_moe T=1 torch float32 (5.00e-01 > 1e-05)" in captured.err
    assert main(["plot", str(out_json)]) == 0
    captured = capsys.readouterr()
    assert "5.00e-01!" in captured.out and "moekit plot: warning" in captured.err


def test_bench_sweeps_with_its_device_current(tiny_config, monkeypatch):
    # --device cuda:N timed cuda:0: do_bench's events and Triton launches follow the current device. The sweep now
    # runs inside cli._on_device(device), which makes it current.
    entered, inside = [], []
    real = cli._on_device

    class Recorder:
        def __init__(self, device):
            self.device, self.ctx = device, real(device)

        def __enter__(self):
            entered.append(self.device)
            self.ctx.__enter__()

        def __exit__(self, *exc):
            entered.remove(self.device)
            return self.ctx.__exit__(*exc)

    point = moekit.bench.bench_point
    monkeypatch.setattr(cli, "_on_device", Recorder)
    monkeypatch.setattr(moekit.bench, "bench_point", lambda *a, **kw: inside.append(list(entered)) or point(*a, **kw))
    assert main(["bench", "--hf-config", str(tiny_config), *FAST, "--device", "cpu"]) == 0
    assert inside == [[torch.device("cpu")]]
    made = []
    monkeypatch.setattr(torch.cuda, "device", lambda device: made.append(device) or cli.contextlib.nullcontext())
    with real(torch.device("cuda", 1)):
        assert made == [torch.device("cuda", 1)]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_bench_on_the_second_gpu_runs_there(tiny_config, monkeypatch):
    current = []
    point = moekit.bench.bench_point
    monkeypatch.setattr(moekit.bench, "bench_point",
                        lambda *a, **kw: current.append(torch.cuda.current_device()) or point(*a, **kw))
    assert main(["bench", "--hf-config", str(tiny_config), "--tokens", "1", "--device", "cuda:1",
                 "--no-baselines"]) == 0
    assert current == [1]


def test_tune_errors_name_tune(capsys):
    assert "moekit tune: --tokens" in _usage_error(capsys, ["tune", "--preset", "qwen3-30b-a3b", "--tokens", "1,x"])
    assert "--min-gain" in _usage_error(capsys, ["tune", "--preset", "olmoe-1b-7b", "--min-gain", "-1"])


@pytest.mark.parametrize("command", ["bench", "tune"])
@pytest.mark.parametrize("tokens", ["0", "1,0", "-4"])
def test_token_counts_must_be_positive(capsys, no_sweep, command, tokens):
    # T = 0 was accepted: its floor is 0, which silently turned the whole plot into a latency plot.
    err = _usage_error(capsys, [command, "--preset", "olmoe-1b-7b", "--device", "cpu", f"--tokens={tokens}"]
                       if command == "bench" else [command, "--preset", "olmoe-1b-7b", f"--tokens={tokens}"])
    assert f"moekit {command}: --tokens: expected positive ints, got {tokens!r}" == err


def test_tune_out_is_checked_before_the_sweep(tmp_path, capsys, monkeypatch):
    # --out was only looked at after the sweep (minutes of GPU time): a missing folder, a file, or a malformed
    # table in it (the run merges into it) is refused up front, before even the CUDA check.
    from moekit.ops import heuristics

    argv = ["tune", "--preset", "olmoe-1b-7b", "--tokens", "1", "--out"]
    assert "does not exist" in _usage_error(capsys, [*argv, str(tmp_path / "nope")])
    (tmp_path / "file").write_text("")
    assert "is not a folder" in _usage_error(capsys, [*argv, str(tmp_path / "file")])
    bad = tmp_path / heuristics.gpu_name() / "olmoe-1b-7b.fp8_block.json"
    bad.parent.mkdir()
    bad.write_text("[1, 2]")
    err = _usage_error(capsys, [*argv, str(tmp_path), "--quant", "fp8_block"])
    assert str(bad) in err and "expected a tuned table" in err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "needs a CUDA device" in _usage_error(capsys, [*argv, str(tmp_path)])  # the bf16 table is fine


def test_cpu_memory_check_counts_the_packed_weights(capsys, no_sweep, monkeypatch):
    # olmoe-1b-7b in bf16 on a CPU: weights 0.81 GB + 1.61 GB of reference fit in 3 GB, but the torch backend packs
    # a second copy of the experts for oneDNN as they run (moekit/kernel/cpu_packed.py).
    monkeypatch.setattr(cli, "device_memory_bytes", lambda device: 3 * 10**9)
    err = _usage_error(capsys, ["bench", "--preset", "olmoe-1b-7b", "--device", "cpu", "--tokens", "1"])
    assert "olmoe-1b-7b" in err and "CPU-packed copy" in err and "3.2 GB" in err


def test_too_many_tokens_are_refused_with_the_activation_size(capsys, no_sweep, tiny_config):
    # Only the weights were counted: a huge --tokens died in the allocator with a traceback.
    err = _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), "--device", "cpu",
                                "--tokens", "99999999999999"])
    assert "activations of T = 99999999999999" in err


def test_plot_of_a_file_without_rows_is_a_usage_error(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text('{"rows": []}')
    err = _usage_error(capsys, ["plot", str(empty), "--plot", str(tmp_path / "x.png")])
    assert str(empty) in err and "no rows" in err


FP8_BLOCK_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128]}


def test_bench_quant_runs_quantized_experts(tiny_config, tmp_path, capsys):
    out = tmp_path / "q.json"
    assert main(["bench", "--hf-config", str(tiny_config), "--quant", "fp8_block", "--tokens", "1,5", "--dtype",
                 "fp32", "--backend", "torch", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "fp8_block" in text.splitlines()[0] and text.splitlines()[-1].split()[-1] == "fp8_block"
    doc = json.loads(out.read_text())
    assert doc["meta"]["quant"] == "fp8_block"
    for r in doc["rows"]:
        # Against the unquantized fp32 reference: within fp8's tolerance, and not bit-exact (it did quantize).
        assert r["quant"] == "fp8_block" and 1e-4 < r["max_rel_err"] < QUANT_TOLERANCES["fp8_e4m3"].max
        assert r["eager_us"] > 0 and r["floor_us"] is None


def test_bench_takes_the_scheme_from_quantization_config(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "quantization_config": FP8_BLOCK_CONFIG}))
    out = tmp_path / "q.json"
    assert main(["bench", "--hf-config", str(path), *FAST, "--json", str(out)]) == 0
    assert [r["quant"] for r in json.loads(out.read_text())["rows"]] == ["fp8_block"]
    int8 = {"quant_method": "compressed-tensors", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "int", "strategy": "token", "symmetric": True,
                              "dynamic": True}}}}
    path.write_text(json.dumps({**TINY, "quantization_config": int8}))
    assert main(["bench", "--hf-config", str(path), *FAST, "--json", str(out), "--quant", "int8_channel"]) == 0
    assert [r["quant"] for r in json.loads(out.read_text())["rows"]] == ["int8_channel"]


@pytest.mark.parametrize(("quantization_config", "scheme"), [
    ({"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}, "w4a16_g128"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
     "w4a16_g128_asym"),
    ({"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 8, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True,
                    "dynamic": False}}}}, "w8a16_g128"),
])
def test_bench_times_weight_only_checkpoints_in_their_scheme(tmp_path, capsys, quantization_config, scheme):
    # A GPTQ / AWQ / compressed-tensors W4A16-style config picks its weight-only scheme; the error column is the
    # kernel's own (against the dequantized weights), far below the 4-bit rounding.
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "quantization_config": quantization_config}))
    out = tmp_path / "q.json"
    assert main(["bench", "--hf-config", str(path), *FAST, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["quant"] for r in rows] == [scheme] and rows[0]["max_rel_err"] < 1e-4
    assert main(["bench", "--hf-config", str(path), *FAST, "--quant", scheme]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == scheme


GPT_OSS = {"model_type": "gpt_oss", "hidden_size": 64, "num_local_experts": 8, "num_experts_per_tok": 2,
           "intermediate_size": 32, "swiglu_limit": 7.0, "quantization_config": {"quant_method": "mxfp4"}}


def test_bench_times_a_gpt_oss_mxfp4_config_in_mxfp4(tmp_path, capsys):
    # gpt-oss ships in mxfp4 only: its config picks the scheme (codes and e8m0 scales, swigluoai with biases);
    # the error column is against the dequantized weights. --quant mxfp4 on an unquantized config does the same.
    path = tmp_path / "config.json"
    path.write_text(json.dumps(GPT_OSS))
    out = tmp_path / "q.json"
    assert main(["bench", "--hf-config", str(path), *FAST, "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["quant"] for r in rows] == ["mxfp4"] and rows[0]["max_rel_err"] < 1e-4
    path.write_text(json.dumps({k: v for k, v in GPT_OSS.items() if k != "quantization_config"}))
    assert main(["bench", "--hf-config", str(path), *FAST, "--quant", "mxfp4"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].split()[-1] == "mxfp4"


@pytest.mark.parametrize(
    "quantization_config, flag, match",
    [
        (FP8_BLOCK_CONFIG, ["--quant", "fp8_tensor"], "--quant fp8_tensor: .* is quantized as fp8_block"),
        ({"quant_method": "gptq", "bits": 4, "group_size": 64}, [], "w4a16_g64 .* is not benchmarked yet"),
        ({"quant_method": "mxfp4"}, ["--quant", "w4a16_g128"], "--quant w4a16_g128: .* is quantized as mxfp4"),
        (None, ["--quant", "fp4"], "--quant: invalid choice: 'fp4'"),
    ],
)
def test_bench_refuses_bad_quant(tmp_path, capsys, no_sweep, quantization_config, flag, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**TINY, "quantization_config": quantization_config}))
    err = _usage_error(capsys, ["bench", "--hf-config", str(path), *FAST, *flag])
    assert re.search(match, err), err


def test_quant_counts_the_quantized_copy_in_the_memory_check(capsys, no_sweep, monkeypatch):
    # deepseek-v3: bf16 weights 22.5 GB + 2.1 GB of reference fit in 30 GB; their fp8 copy (11.3 GB) does not.
    monkeypatch.setattr(cli, "device_memory_bytes", lambda device: 30 * 10**9)
    err = _usage_error(capsys, ["bench", "--preset", "deepseek-v3", "--device", "cpu", "--quant", "fp8_block"])
    assert "deepseek-v3" in err and "fp8_block" in err and "30.0 GB" in err


def test_bench_refuses_more_mistakes_before_the_sweep(tmp_path, capsys, no_sweep, tiny_config, monkeypatch):
    cfg = ["bench", "--hf-config", str(tiny_config), *FAST]
    # An image type matplotlib cannot write, or no suffix (it wrote a .png beside the name): after the sweep.
    for name in ("out.jpgg", "noext"):
        assert "--plot" in _usage_error(capsys, [*cfg, "--plot", str(tmp_path / name)])
    # Empty values were taken for the defaults.
    assert "--tokens" in _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), "--tokens", ""])
    assert "--preset" in _usage_error(capsys, ["bench", "--preset", "", "--tokens", "1"])
    assert "not both" in _usage_error(capsys, ["bench", "--hf-config", "", "--preset", "olmoe-1b-7b"])
    assert "'all' stands alone" in _usage_error(capsys, ["bench", "--preset", "all,olmoe-1b-7b"])
    # A seed numpy/torch cannot take: an OverflowError after the checks.
    assert "--seed" in _usage_error(capsys, [*cfg, "--seed", str(10**30)])
    assert "--seed" in _usage_error(capsys, ["eplb", "--ranks", "4", "--synthetic-skew", "1", "--seed", "-1"])
    # mxfp4 of a size it cannot store.
    odd = tmp_path / "odd.json"
    odd.write_text(json.dumps({**TINY, "moe_intermediate_size": 40}))
    assert "multiple of 32" in _usage_error(capsys, ["bench", "--hf-config", str(odd), *FAST, "--quant", "mxfp4"])
    # Triton's interpreter computes bf16 dots wrongly.
    monkeypatch.setattr(moekit.kernel, "available_backends", lambda device: ["torch", "triton"])
    assert "bf16" in _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), "--tokens", "1", "--backend",
                                           "triton", "--no-baselines"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_an_existing_file_that_is_not_writable_is_refused_before_the_sweep(tmp_path, capsys, no_sweep, tiny_config):
    ro = tmp_path / "ro.json"
    ro.write_text("x")
    ro.chmod(0o444)
    err = _usage_error(capsys, ["bench", "--hf-config", str(tiny_config), *FAST, "--json", str(ro)])
    assert "not writable" in err


def test_preset_names_are_normalized():
    from moekit.cli import _preset_shapes

    assert [s.name for s in _preset_shapes(" OLMOE-1b-7b, olmoe-1b-7b,")] == ["olmoe-1b-7b"]


@pytest.mark.parametrize("field, value", [("moekit_us", "7127.9"), ("moekit_us", 0), ("max_rel_err", None),
                                          ("tokens", 0), ("grouped_mm_us", "x")])
def test_plot_of_hand_edited_rows_names_the_field(tiny_config, tmp_path, capsys, field, value):
    out = tmp_path / "b.json"
    assert main(["bench", "--hf-config", str(tiny_config), *FAST, "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    doc["rows"][0][field] = value
    out.write_text(json.dumps(doc))
    capsys.readouterr()
    err = _usage_error(capsys, ["plot", str(out)])
    assert field in err and str(out) in err


def test_a_reader_that_went_away_ends_the_command_quietly(monkeypatch):
    # `moekit eplb ... | head` closed the pipe mid-print: a BrokenPipeError traceback and exit 1.
    import moekit.cli as cli

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(cli, "_info", reader_gone)
    monkeypatch.setattr(cli.os, "dup2", lambda fd, fd2: None)  # leave this test's stdout as it is
    assert cli.main(["info"]) == cli.EXIT_OK
