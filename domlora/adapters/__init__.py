"""Adapters: PEFT configs per LoRA variant attached at exact module names (`variants`), NoRM's
post-training reduction (`norm`) and IST's (and its RST ablation's) layer sampling during training (`ist`)."""
