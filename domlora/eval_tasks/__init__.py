"""lm-eval task definitions shipped with domlora (YAML + utils.py), and their shared scoring.

Load them the lm-eval way: `TaskManager(include_path=TASKS_DIR, metadata={"data_dir": ...})`;
from the lm-eval CLI: `lm_eval --include_path <this folder> --metadata '{"data_dir": "data"}'`.
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
