"""Side studies built on the core: PAGE's decomposition and across checkpoints (`decompose`, `checkpoints`,
whose grid stage is `checkpoints_stage`), task stability (`stability`) and massive-activation diagnostics
(`diagnostics`). Nothing in the core imports these; they are reached only from their own commands
(`domlora decompose|checkpoints|stability|diagnose`) and stage (`stages/checkpoints.py`). The budgeted
entries of B under SFT and GRPO are training regimes (`domlora.regimes`)."""
