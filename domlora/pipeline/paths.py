"""Layout: the one place artefact paths are spelled (dvc.yaml spells the same ones; a test checks)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from domlora.pipeline.params import Cell


@dataclass(frozen=True)
class Layout:
    root: Path = Path(".")

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    # prepare_data
    @property
    def data_root(self) -> Path:
        return self.root / "data"

    def data_dir(self, dataset: str) -> Path:
        return self.data_root / dataset

    def split(self, dataset: str, split: str) -> Path:
        return self.data_dir(dataset) / f"{split}.jsonl"

    # probe
    def probe_dir(self, model: str, dataset: str) -> Path:
        return self.root / "probes" / model / dataset

    def probe_json(self, model: str, dataset: str, kind: str) -> Path:
        """One of the probe's documents: `page`, `nfn`, `activations` or `massive`."""
        return self.probe_dir(model, dataset) / f"{kind}.json"

    def page_json(self, model: str, dataset: str) -> Path:
        return self.probe_json(model, dataset, "page")

    def massive_json(self, model: str, dataset: str) -> Path:
        return self.probe_json(model, dataset, "massive")

    def page_png(self, model: str, dataset: str) -> Path:
        """PAGE as a layer x type heatmap."""
        return self.probe_dir(model, dataset) / "page.png"

    def page_layers_csv(self, model: str, dataset: str) -> Path:
        """PAGE by layer, one column per module type (a DVC plot)."""
        return self.probe_dir(model, dataset) / "page_layers.csv"

    def checkpoints_json(self, model: str, dataset: str) -> Path:
        """PAGE across full fine-tuning checkpoints (the Figure 2 study)."""
        return self.probe_dir(model, dataset) / "checkpoints.json"

    def checkpoints_work(self, model: str, dataset: str) -> Path:
        """Where the checkpoint study keeps its step checkpoints (whole models) while it probes them."""
        return self.root / ".checkpoints_work" / f"{model}-{dataset}"

    # select
    def placement(self, model: str, dataset: str, method: str) -> Path:
        return self.root / "placements" / model / dataset / f"{method}.json"

    # tune: the learning rate of each budget class (beside the placements it is chosen for)
    def tune_dir(self, model: str, dataset: str, budget: str) -> Path:
        """The sweep results of a budget class, one JSON per method and learning rate."""
        return self.root / "placements" / model / dataset / "tuning" / budget

    def sweep_json(self, model: str, dataset: str, budget: str, method: str, index: int) -> Path:
        return self.tune_dir(model, dataset, budget) / f"{method}-lr{index}.json"

    def tune_json(self, model: str, dataset: str, budget: str) -> Path:
        """The class's chosen learning rate and the evidence."""
        return self.root / "placements" / model / dataset / "tuning" / f"{budget}.json"

    # train / evaluate
    def run_dir(self, cell: Cell | str) -> Path:
        return self.root / "runs" / (cell.id if isinstance(cell, Cell) else cell)

    def adapter(self, cell: Cell) -> Path:
        return self.run_dir(cell) / "adapter"

    def train_metrics(self, cell: Cell) -> Path:
        return self.run_dir(cell) / "train_metrics.json"

    def loss_csv(self, cell: Cell) -> Path:
        return self.run_dir(cell) / "loss.csv"

    def eval_json(self, cell: Cell | str) -> Path:
        return self.run_dir(cell) / "eval.json"

    def scores_json(self, cell: Cell | str) -> Path:
        return self.run_dir(cell) / "scores.json"

    def base_id(self, model: str, dataset: str) -> str:
        return f"{model}-{dataset}-base"

    # report
    @property
    def reports(self) -> Path:
        return self.root / "reports"
