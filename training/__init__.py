"""InstructERC multi-task LoRA training. Templates, labels and label tokens come from
``service`` (one source of truth); this package only builds examples and trains."""
