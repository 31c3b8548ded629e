"""Model pieces: building segment modules from their spec, merging inputs, losses and metrics."""
