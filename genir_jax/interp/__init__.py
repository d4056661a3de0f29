"""Interventions, sweeps and their grammar, the patching engine, metrics, rank window, attribution."""
