"""Side studies built on the core: budgeted entries of B under SFT and GRPO (`sparse_b`, `grpo`),
PAGE's decomposition and across checkpoints (`decompose`, `checkpoints`), task stability
(`stability`) and massive-activation diagnostics (`diagnostics`). The pipeline core never
imports these, except to run them as grid methods."""
