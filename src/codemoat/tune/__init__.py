"""LoRA fine-tuning on indexed customer code: adapters per team, sealed to this machine, served by group."""
