"""The moekit CLI: bench (with an --hf-config shape so it stays fast), JSON/plot/markdown outputs, info."""

import json

import pytest

from moekit.cli import main


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2_moe", "hidden_size": 64, "num_experts": 8,
                                "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                "shared_expert_intermediate_size": 48, "intermediate_size": 128,
                                "hidden_act": "silu"}))
    return path


def test_bench_writes_table_json_plot_markdown(tiny_config, tmp_path, capsys):
    out_json, out_png, out_md = tmp_path / "b.json", tmp_path / "b.png", tmp_path / "b.md"
    rc = main(["bench", "--hf-config", str(tiny_config), "--tokens", "0,1,5", "--dtype", "fp32",
               "--backend", "torch", "--json", str(out_json), "--plot", str(out_png), "--markdown", str(out_md)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "moekit us" in text and "qwen2_moe" in text
    doc = json.loads(out_json.read_text())
    assert [r["tokens"] for r in doc["rows"]] == [0, 1, 5]
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


@pytest.mark.parametrize(
    "config, match",
    [
        ({"text_config": None, "hidden_size": 64, "num_experts": 4, "num_experts_per_tok": 8,
          "moe_intermediate_size": 32}, "top-k 8 exceeds the expert count 4"),
        ({"hidden_size": 64, "num_experts": 4, "moe_topk": [2, 2], "moe_intermediate_size": 32},
         "moe_topk must be a positive int"),
        ([1, 2], "expected a JSON object"),
        ({"hidden_size": 64, "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
          "hidden_act": "quick_gelu"}, "hidden_act"),
    ],
)
def test_bench_rejects_bad_hf_configs(tmp_path, config, match):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    with pytest.raises(SystemExit, match=match):
        main(["bench", "--hf-config", str(path)])


def test_bench_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit, match="unknown"):
        main(["bench", "--preset", "llama-moe"])
    with pytest.raises(SystemExit, match="--tokens"):
        main(["bench", "--tokens", "a,b"])


def test_info(capsys):
    assert main(["info"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "torch" in doc["backends"]["cpu"] and doc["torch"]


def test_bench_json_records_the_command_it_ran(tiny_config, tmp_path):
    # meta.command is how a JSON file is reproduced: it must be this call's arguments, not the host process's
    # sys.argv (pytest's, or any program's that calls main(argv)).
    out_json = tmp_path / "b.json"
    argv = ["bench", "--hf-config", str(tiny_config), "--tokens", "1", "--dtype", "fp32", "--backend", "torch",
            "--no-baselines", "--json", str(out_json)]
    assert main(argv) == 0
    assert json.loads(out_json.read_text())["meta"]["command"] == "moekit " + " ".join(argv)


def test_tune_token_errors_name_tune():
    with pytest.raises(SystemExit, match="moekit tune: --tokens"):
        main(["tune", "--preset", "qwen3-30b-a3b", "--tokens", "1,x"])


def test_bench_rejects_preset_with_hf_config(tmp_path):
    cfg = tmp_path / "config.json"
    cfg.write_text('{"num_experts": 4, "hidden_size": 16, "moe_intermediate_size": 8, "num_experts_per_tok": 2, '
                   '"hidden_act": "silu"}')
    with pytest.raises(SystemExit, match="not both"):
        main(["bench", "--preset", "olmoe-1b-7b", "--hf-config", str(cfg)])
