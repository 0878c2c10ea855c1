"""Training regimes: plain SFT (`train.loop.train`), sparse-B SFT (`sparse_b`: A frozen, k chosen entries of B
trainable) and GRPO (`grpo`, with or without sparse B), all on the adapters of `domlora.adapters` and all
writing the one `TrainRecord`. Their settings (`settings`) are what a method's `sparse_b:` / `grpo:` sections
validate into; the train stage looks the regime up by name (`dispatch.REGIMES`, `dispatch.regime_of`)."""
