"""The EPLB load recorder (window sums across wrap-around, no buffer reallocated after construction, graph
capture on CUDA) and the JSON/CSV load files it writes."""

import json

import pytest
import torch

from moekit.distributed import ExpertLoadRecorder, read_expert_load, write_expert_load


def buffers(rec):
    return [t.data_ptr() for t in (rec.current, rec.window_counts, rec.row, rec.steps, rec._one)]


def test_window_sums_after_wrap_around():
    num_layers, num_experts, window = 3, 5, 4
    rec = ExpertLoadRecorder(num_layers, num_experts, window=window)
    ptrs = buffers(rec)
    history = []
    for step in range(11):  # wraps the 4-row ring twice
        ids = [torch.randint(0, num_experts, (step + 1, 2), dtype=torch.int32) for _ in range(num_layers)]
        for layer, topk_ids in enumerate(ids):
            rec.record(layer, topk_ids)
        history.append(torch.stack([torch.bincount(i.flatten().long(), minlength=num_experts) for i in ids]))
        # The step in progress is not in the window yet.
        assert torch.equal(rec.load(), sum(history[-window - 1:-1], torch.zeros(num_layers, num_experts,
                                                                                dtype=torch.int64)))
        rec.step()
        assert torch.equal(rec.load(), sum(history[-window:]))
        assert rec.load().dtype == torch.int64 and rec.load().shape == (num_layers, num_experts)
    assert int(rec.steps) == 11 and int(rec.row) == 11 % window
    # Nothing was reallocated: a captured CUDA graph keeps writing into the same buffers.
    assert buffers(rec) == ptrs


def test_record_counts_duplicates_and_any_shape():
    rec = ExpertLoadRecorder(1, 4, window=2)
    rec.record(0, torch.tensor([[1, 1], [1, 3]], dtype=torch.uint8))
    rec.record(0, torch.tensor([3], dtype=torch.int64))
    rec.record(0, torch.empty(0, 2, dtype=torch.int32))  # a rank with no tokens
    rec.step()
    assert rec.load().tolist() == [[0, 3, 0, 2]]
    rec.reset()
    assert rec.load().tolist() == [[0, 0, 0, 0]] and int(rec.steps) == 0


def test_record_refuses_bad_input():
    rec = ExpertLoadRecorder(2, 4, window=2)
    with pytest.raises(ValueError, match=r"layer: expected an int in \[0, 2\), got 2"):
        rec.record(2, torch.zeros(1, 1, dtype=torch.int32))
    with pytest.raises(TypeError, match="topk_ids: expected an integer dtype"):
        rec.record(0, torch.zeros(1, 1))
    # An id >= E must not land in the next layer's counts.
    with pytest.raises(IndexError):
        rec.record(0, torch.tensor([[4]]))
    assert rec.current.sum() == 0
    for args, match in (((0, 4), "num_layers: expected a positive int"), ((1, 4, 0), "window: expected a positive")):
        with pytest.raises(ValueError, match=match):
            ExpertLoadRecorder(*args)


@pytest.mark.parametrize("suffix", [".json", ".csv"])
def test_save_and_read_round_trip(tmp_path, suffix):
    rec = ExpertLoadRecorder(2, 3, window=5)
    rec.record(0, torch.tensor([[0, 2], [2, 2]]))
    rec.record(1, torch.tensor([[1, 1]]))
    rec.step()
    path = tmp_path / f"load{suffix}"
    rec.save(path)
    loaded = read_expert_load(path)
    assert loaded.dtype == torch.int64 and loaded.tolist() == [[1, 0, 3], [0, 2, 0]]
    if suffix == ".json":
        doc = json.loads(path.read_text())
        assert doc["format"] == "moekit.expert_load" and doc["steps"] == 1 and doc["num_experts"] == 3
    else:
        assert path.read_text().splitlines() == ["layer,expert_0,expert_1,expert_2", "0,1,0,3", "1,0,2,0"]


def test_float_loads_round_trip(tmp_path):
    path = tmp_path / "load.csv"
    write_expert_load(path, torch.tensor([[0.5, 2.0]], dtype=torch.float64))
    loaded = read_expert_load(path)
    assert loaded.dtype == torch.float64 and loaded.tolist() == [[0.5, 2.0]]


@pytest.mark.parametrize("name,text,match", [
    ("a.json", "{not json", "not valid JSON"),
    ("a.json", json.dumps({"load": [[1, 2]]}), "expected a JSON object with \"format\""),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 2, "load": [[1]]}), "expected version 1"),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 1, "load": [[1, 2], [3]]}),
     "layer 1: expected 2 experts"),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 1, "load": [[1, -2]]}),
     "expected finite loads >= 0, got -2"),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 1, "load": [[1, "x"]]}),
     r"load\[0\]: expected a list of numbers"),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 1, "load": []}), "at least one layer"),
    ("a.json", json.dumps({"format": "moekit.expert_load", "version": 1, "num_experts": 3, "load": [[1, 2]]}),
     "num_experts is 3 but load has 2"),
    ("a.csv", "", "empty"),
    ("a.csv", "l,e0\n0,1\n", "expected the header"),
    ("a.csv", "layer,expert_0,expert_1\n0,1\n", "line 2: expected 3 fields"),
    ("a.csv", "layer,expert_0\n1,1\n", "line 2: expected layer 0"),
    ("a.csv", "layer,expert_0\n0,abc\n", "line 2: expected a number, got 'abc'"),
    ("a.csv", "layer,expert_0\n0,nan\n", "expected finite loads"),
    ("a.txt", "", "expected a .json or .csv file"),
])
def test_read_refuses_malformed_files(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        read_expert_load(path)


def test_read_missing_file(tmp_path):
    with pytest.raises(OSError):
        read_expert_load(tmp_path / "missing.json")


@pytest.mark.gpu
def test_recording_inside_a_cuda_graph():
    rec = ExpertLoadRecorder(2, 8, window=3, device="cuda")
    ids = torch.zeros(16, 2, dtype=torch.int32, device="cuda")
    ptrs = buffers(rec)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture, as torch asks
        rec.record(0, ids)
        rec.step()
    torch.cuda.current_stream().wait_stream(stream)
    rec.reset()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        rec.record(0, ids)
        rec.record(1, ids + 1)
        rec.step()
    history = []
    for step in range(5):
        ids.copy_(torch.randint(0, 7, (16, 2), dtype=torch.int32))
        history.append(torch.stack([torch.bincount(ids.flatten().long().cpu(), minlength=8),
                                    torch.bincount(ids.flatten().long().cpu() + 1, minlength=8)]))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(rec.load().cpu(), sum(history[-3:]))
    assert buffers(rec) == ptrs and int(rec.steps) == 5


def test_device_given_with_or_without_index():
    # A recorder made for "cuda" holds buffers on "cuda:0", which is what topk_ids report; "cpu:0" is the CPU
    # analogue. Comparing against the device as given refused every id.
    rec = ExpertLoadRecorder(1, 4, window=2, device="cpu:0")
    rec.record(0, torch.tensor([[1, 2]]))
    rec.step()
    assert rec.load().tolist() == [[0, 1, 1, 0]] and rec.device == torch.device("cpu")


@pytest.mark.parametrize(("load", "match"), [
    (torch.tensor([[1.0, float("nan")]]), "expected finite loads >= 0"),
    (torch.tensor([[1.0, float("inf")]]), "expected finite loads >= 0"),
    (torch.tensor([[-5, 3]]), "expected finite loads >= 0"),
    (torch.zeros(0, 3), "expected at least one layer and one expert"),
])
def test_write_refuses_what_read_refuses(tmp_path, load, match):
    # Written before (JSON NaN is not even JSON), then refused by read_expert_load.
    for suffix in (".json", ".csv"):
        path = tmp_path / f"load{suffix}"
        with pytest.raises(ValueError, match=rf"load: {match}"):
            write_expert_load(path, load)
        assert not path.exists()
