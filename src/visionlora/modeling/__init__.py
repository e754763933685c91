"""Models: loading checkpoints safely, adapters through peft, and the built-in small models."""
