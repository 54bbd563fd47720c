"""Fine-tuning: the loop and its step, its settings, the run directory, the distillation teacher."""
