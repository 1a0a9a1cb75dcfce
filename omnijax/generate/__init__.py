"""Running tasks with a trained model: per-task decode settings, requests, `omnijax generate`."""
