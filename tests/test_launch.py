"""The train stage starts the processes its recipe asks for, and the paper grid's own rules hold."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from domlora.errors import ConfigError
from domlora.pipeline.launch import check_devices, launch_command
from domlora.pipeline.params import load_params, parse_profile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paper():
    return yaml.safe_load((ROOT / "params.yaml").read_text())["profiles"]["paper"]


class TestLauncher:
    def test_one_process_runs_here(self, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        assert launch_command(1, ["stages.train", "--cell", "c"]) is None

    def test_cpu_processes_go_through_torchrun(self, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        monkeypatch.setattr("os.cpu_count", lambda: 4)
        cmd = launch_command(2, ["stages.train", "--cell", "c"])
        assert Path(cmd[0]).name == "torchrun" and cmd[1:] == ["--standalone", "--nproc_per_node", "2", "-m",
                                                               "stages.train", "--cell", "c"]

    def test_gpus_go_through_accelerate_launch(self, monkeypatch):
        monkeypatch.delenv("WORLD_SIZE", raising=False)
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.device_count", lambda: 8)
        cmd = launch_command(8, ["stages.train", "--cell", "c"])
        assert Path(cmd[0]).name == "accelerate" and "--multi_gpu" in cmd
        assert cmd[cmd.index("--num_processes") + 1] == "8" and cmd[-4:] == ["-m", "stages.train", "--cell", "c"]

    def test_inside_a_launched_process_nothing_is_started(self, monkeypatch):
        monkeypatch.setenv("WORLD_SIZE", "8")
        assert launch_command(8, ["stages.train"]) is None

    def test_more_processes_than_devices_is_refused_before_work(self, monkeypatch):
        monkeypatch.setattr("torch.cuda.is_available", lambda: True)
        monkeypatch.setattr("torch.cuda.device_count", lambda: 2)
        with pytest.raises(ConfigError, match=r"num_processes is 8 but this machine has 2 GPU.*grad_accum by 4"):
            check_devices(8)
        monkeypatch.setattr("torch.cuda.is_available", lambda: False)
        monkeypatch.setattr("os.cpu_count", lambda: 2)
        with pytest.raises(ConfigError, match="no GPU and 2 CPU core"):
            check_devices(8)


def test_record_flags_an_effective_batch_that_is_not_the_recipes(tiny_checkpoint, chat_jsonl, tmp_path, caplog):
    """Run in one process, a recipe of 2 processes trains at half its batch: the record and the log say so."""
    from domlora.train.config import TrainConfig
    from domlora.train.loop import train

    cfg = TrainConfig(rank=4, alpha=8, max_steps=1, batch_size=2, grad_accum=2, num_processes=2, max_length=64,
                      gradient_checkpointing=False, save_every=0)
    doc = train(model=str(tiny_checkpoint), train_data=chat_jsonl, placement=None, out_dir=tmp_path / "r", cfg=cfg)
    assert (doc["samples_per_step"], doc["intended_batch"], doc["world_size"]) == (4, 8, 1)
    assert "effective batch is 4" in caplog.text and "not the recipe's 8" in caplog.text


class TestPaperGrid:
    def test_probe_at_the_training_length_and_once_per_backbone(self):
        from domlora.pipeline.grid import grid_doc

        p = load_params(ROOT / "params.yaml", profile="paper")
        assert p.probe_max_length() == p.train.max_length == 3072
        selects = grid_doc(p)["selects"]
        assert {s["probe"] for s in selects.values()} == {"tulu"}
        e = load_params(ROOT / "params.yaml", profile="embedded")
        assert all(s["probe"] == s["dataset"] for s in grid_doc(e)["selects"].values())

    def test_figure2_is_stages_of_the_grid(self):
        from domlora.pipeline.grid import grid_doc

        doc = grid_doc(load_params(ROOT / "params.yaml", profile="paper"))
        assert set(doc["checkpoint_studies"]) == {"qwen3_8b-tulu", "llama31_8b-tulu"}
        assert not grid_doc(load_params(ROOT / "params.yaml", profile="embedded"))["checkpoint_studies"]

    def test_paper_recipe_is_eight_processes_and_the_rehearsal_the_paper(self):
        p, r = (load_params(ROOT / "params.yaml", profile=x) for x in ("paper", "rehearsal"))
        assert p.train.num_processes * p.train.batch_size * p.train.grad_accum == 256
        assert p.grid == r.grid and p.methods == r.methods and p.checkpoints == r.checkpoints
        assert {d.tasks[0] for d in p.datasets.values()} == {d.tasks[0] for d in r.datasets.values()}
        assert all(m.id.startswith("stand-in:") for m in r.models.values()) and r.eval.stand_in

    @pytest.mark.parametrize("mutate,match", [
        (lambda d: d["methods"]["down_last"].update(models=["llama_3"]), "not a model of this profile"),
        (lambda d: d["methods"]["down_last"].update(layers={"llama31_8b": [32]}), "layer 32, out of range"),
        (lambda d: d["methods"]["down_last"].update(models=[], layers={"llama31_8b": [31]}), "no layers for model 'qwen3_8b'"),
        (lambda d: d["grid"].update(models=["qwen3_8b"]), None),
    ])
    def test_bad_restrictions_and_layers_fail_before_work(self, paper, mutate, match):
        d = copy.deepcopy(paper)
        mutate(d)
        if match is None:  # the LLaMA-only methods have nothing to run on a Qwen-only grid
            with pytest.raises(ConfigError, match="runs only on"):
                parse_profile(d, name="paper")
            return
        with pytest.raises(ConfigError, match=match):
            parse_profile(d, name="paper")
